//! Diagnostics: what was wrong with the command line, and what was done about it.

use core::fmt;

use crate::value::{write_joined, Bdf, ValueKind};
use crate::{GuestName, OptionSpec};

/// Names an option, or one field of a structured option (`guest.mem`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionPath {
    /// Top-level option name.
    pub option: &'static str,
    /// Field name, for structured options.
    pub field: Option<&'static str>,
}

impl OptionPath {
    pub(crate) const fn option(option: &'static str) -> Self {
        OptionPath {
            option,
            field: None,
        }
    }

    pub(crate) const fn field(option: &'static str, field: &'static str) -> Self {
        OptionPath {
            option,
            field: Some(field),
        }
    }
}

impl fmt::Display for OptionPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.option)?;
        if let Some(field) = self.field {
            write!(f, ".{field}")?;
        }
        Ok(())
    }
}

/// One problem found in the command line.
///
/// In every case parsing went on and the configuration kept a sensible value (see each
/// variant). The [`Display`](fmt::Display) form is a complete sentence for the console,
/// including the valid names or values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Diagnostic<'a> {
    /// An option name that is not in the table; the token was ignored.
    UnknownOption {
        /// The name as written.
        name: &'a str,
    },
    /// A field name of a structured option that is not in its field table; the field was
    /// ignored.
    UnknownField {
        /// The option the field was given to.
        option: &'static str,
        /// The field name as written.
        field: &'a str,
        /// The valid fields.
        valid: &'static [OptionSpec],
    },
    /// An option (or field) that needs a value was given without `=value`; it was ignored.
    MissingValue {
        /// The option or field.
        path: OptionPath,
        /// What it accepts.
        expected: &'static ValueKind,
    },
    /// A value that is not valid for its option (or field); it was ignored, so the option kept
    /// its default or the previous valid value.
    BadValue {
        /// The option or field.
        path: OptionPath,
        /// The value as written (for a list, the offending item).
        value: &'a str,
        /// What it accepts.
        expected: &'static ValueKind,
    },
    /// A non-repeatable option (or field) was given again; the last valid value wins. This is
    /// a warning: nothing was ignored.
    Duplicate {
        /// The option or field.
        path: OptionPath,
    },
    /// More occurrences or items than the fixed capacity; the excess was ignored.
    TooMany {
        /// The option or field.
        path: OptionPath,
        /// The capacity.
        max: usize,
    },
    /// Two guests with the same name; the later definition was ignored.
    DuplicateGuest {
        /// The name.
        name: GuestName,
    },
    /// A device assigned to two guests; it stays with the first and was removed from the other.
    DeviceConflict {
        /// The device.
        device: Bdf,
        /// The guest it was removed from.
        guest: GuestName,
        /// The guest that keeps it.
        owner: GuestName,
    },
}

impl Diagnostic<'_> {
    /// `true` for diagnostics where nothing was ignored ([`Diagnostic::Duplicate`]).
    pub const fn is_warning(&self) -> bool {
        matches!(self, Diagnostic::Duplicate { .. })
    }
}

impl fmt::Display for Diagnostic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnostic::UnknownOption { name } => {
                write!(f, "unknown option `{name}` ignored; valid options: ")?;
                write_joined(f, crate::OPTIONS.iter().map(|s| &s.name), ", ")
            }
            Diagnostic::UnknownField {
                option,
                field,
                valid,
            } => {
                write!(
                    f,
                    "unknown field `{field}` in {option}= ignored; valid fields: "
                )?;
                write_joined(f, valid.iter().map(|s| &s.name), ", ")
            }
            Diagnostic::MissingValue { path, expected } => {
                write!(f, "{path} needs a value, ignored; expected {expected}")
            }
            Diagnostic::BadValue {
                path,
                value,
                expected,
            } => write!(
                f,
                "bad value `{value}` for {path} ignored; expected {expected}"
            ),
            Diagnostic::Duplicate { path } => {
                write!(f, "{path} given more than once; the last valid value wins")
            }
            Diagnostic::TooMany { path, max } => {
                write!(
                    f,
                    "too many {path} values (at most {max}); the rest ignored"
                )
            }
            Diagnostic::DuplicateGuest { name } => {
                write!(
                    f,
                    "guest `{name}` defined twice; the later definition ignored"
                )
            }
            Diagnostic::DeviceConflict {
                device,
                guest,
                owner,
            } => write!(
                f,
                "device {device} already assigned to guest `{owner}`; not assigned to `{guest}`"
            ),
        }
    }
}

impl core::error::Error for Diagnostic<'_> {}

/// Maximum number of diagnostics [`Diagnostics`] keeps; later ones are only counted.
pub const MAX_DIAGNOSTICS: usize = 16;

/// A fixed-capacity list of diagnostics, in command-line order.
#[derive(Clone, Copy, Debug)]
pub struct Diagnostics<'a> {
    items: [Option<Diagnostic<'a>>; MAX_DIAGNOSTICS],
    len: usize,
    dropped: usize,
}

impl<'a> Diagnostics<'a> {
    /// An empty list.
    pub const fn new() -> Self {
        Diagnostics {
            items: [None; MAX_DIAGNOSTICS],
            len: 0,
            dropped: 0,
        }
    }

    /// Appends `d`, or counts it in [`Self::dropped`] when the list is full.
    pub fn push(&mut self, d: Diagnostic<'a>) {
        match self.items.get_mut(self.len) {
            Some(slot) => {
                *slot = Some(d);
                self.len += 1;
            }
            None => self.dropped = self.dropped.saturating_add(1),
        }
    }

    /// The kept diagnostics.
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic<'a>> + '_ {
        self.items.iter().flatten()
    }

    /// Number of kept diagnostics.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// `true` when the command line had no problem at all.
    pub const fn is_empty(&self) -> bool {
        self.len == 0 && self.dropped == 0
    }

    /// Number of diagnostics that did not fit.
    pub const fn dropped(&self) -> usize {
        self.dropped
    }
}

impl Default for Diagnostics<'_> {
    fn default() -> Self {
        Self::new()
    }
}
