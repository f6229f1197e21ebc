//! Value kinds of the option table and the parsers for their scalar forms.
//!
//! Everything here works on `&str` slices of the command line: no allocation, no panics, no
//! arithmetic overflow (all arithmetic is checked).

use core::fmt;

use crate::OptionSpec;

/// What an option (or a field of a structured option) accepts.
///
/// The [`Display`](fmt::Display) form describes the accepted values in words; it is what a
/// [`Diagnostic`](crate::Diagnostic) shows after "expected".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// One word out of a fixed list (compared ASCII case-insensitively).
    Choice(&'static [&'static str]),
    /// An unsigned integer, decimal or `0x` hexadecimal, in `min..=max`; `word` (when present)
    /// is an extra spelling meaning "no limit" (for example `smp=all`).
    Int {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
        /// Word standing for "unlimited", if any.
        word: Option<&'static str>,
    },
    /// A byte size with an optional binary suffix (`K`, `M`, `G`, `T`, optionally followed by
    /// `B` or `iB`), such as `64M` or `1G`, in `min..=max` and a multiple of `align`.
    Size {
        /// Smallest accepted size in bytes.
        min: u64,
        /// Largest accepted size in bytes.
        max: u64,
        /// Required granularity in bytes (a power of two).
        align: u64,
    },
    /// `on`/`off` (also `yes`/`no`, `true`/`false`, `1`/`0`); a bare option name means `on`.
    Bool,
    /// A PCI function address `[segment:]bus:device.function` in hexadecimal.
    Bdf,
    /// A short identifier: ASCII letters, digits, `-`, `_` and `.`.
    Name {
        /// Maximum length in bytes.
        max_len: usize,
    },
    /// Up to `max` items of kind `item`, separated by `sep`.
    List {
        /// Kind of every item.
        item: &'static ValueKind,
        /// Separator between items.
        sep: char,
        /// Maximum number of items.
        max: usize,
    },
    /// Comma-separated `field=value` pairs, each field described by its own table.
    Record(&'static [OptionSpec]),
}

/// A successfully parsed scalar value (everything but [`ValueKind::List`] and
/// [`ValueKind::Record`], which the parser takes apart into scalars).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    /// Index into the [`ValueKind::Choice`] list.
    Choice(usize),
    /// `None` when the "unlimited" word was given.
    Int(Option<u64>),
    Size(u64),
    Bool(bool),
    Bdf(Bdf),
    Name(&'a str),
}

impl ValueKind {
    /// Parses `text` as a scalar of this kind; `None` when it is not a valid value (or when
    /// the kind is a list or a record, which have no scalar form).
    pub(crate) fn parse<'a>(&self, text: &'a str) -> Option<Value<'a>> {
        match *self {
            ValueKind::Choice(names) => names
                .iter()
                .position(|n| n.eq_ignore_ascii_case(text))
                .map(Value::Choice),
            ValueKind::Int { min, max, word } => {
                if word.is_some_and(|w| w.eq_ignore_ascii_case(text)) {
                    return Some(Value::Int(None));
                }
                let v = parse_u64(text)?;
                (min..=max).contains(&v).then_some(Value::Int(Some(v)))
            }
            ValueKind::Size { min, max, align } => {
                let v = parse_size(text)?;
                let aligned = align <= 1 || v % align == 0;
                ((min..=max).contains(&v) && aligned).then_some(Value::Size(v))
            }
            ValueKind::Bool => parse_bool(text).map(Value::Bool),
            ValueKind::Bdf => parse_bdf(text).map(Value::Bdf),
            ValueKind::Name { max_len } => {
                let ok = !text.is_empty()
                    && text.len() <= max_len
                    && text
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                ok.then_some(Value::Name(text))
            }
            ValueKind::List { .. } | ValueKind::Record(_) => None,
        }
    }
}

impl fmt::Display for ValueKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ValueKind::Choice(names) => {
                f.write_str("one of ")?;
                write_joined(f, names.iter(), ", ")
            }
            ValueKind::Int { min, max, word } => {
                write!(f, "an integer from {min} to {max}")?;
                if let Some(w) = word {
                    write!(f, " or `{w}`")?;
                }
                Ok(())
            }
            ValueKind::Size { min, max, align } => {
                write!(
                    f,
                    "a size from {} to {} (suffix K, M, G or T, such as 64M)",
                    SizeDisplay(min),
                    SizeDisplay(max)
                )?;
                if align > 1 {
                    write!(f, " in multiples of {}", SizeDisplay(align))?;
                }
                Ok(())
            }
            ValueKind::Bool => f.write_str("on or off"),
            ValueKind::Bdf => f.write_str(
                "a PCI address [segment:]bus:device.function in hex (device 00-1f, function 0-7), such as 00:05.0",
            ),
            ValueKind::Name { max_len } => write!(
                f,
                "a name of 1 to {max_len} characters (letters, digits, '-', '_', '.')"
            ),
            ValueKind::List { item, sep, max } => {
                write!(f, "up to {max} items separated by '{sep}', each {item}")
            }
            ValueKind::Record(fields) => {
                f.write_str("comma-separated field=value pairs with fields ")?;
                write_joined(f, fields.iter().map(|s| &s.name), ", ")
            }
        }
    }
}

/// Writes the items separated by `sep`.
pub(crate) fn write_joined<'s, I>(f: &mut fmt::Formatter<'_>, items: I, sep: &str) -> fmt::Result
where
    I: Iterator<Item = &'s &'static str>,
{
    for (i, item) in items.enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        f.write_str(item)?;
    }
    Ok(())
}

/// Parses an unsigned integer: decimal digits, or `0x` followed by hexadecimal digits. No sign,
/// no separators, no whitespace.
pub(crate) fn parse_u64(text: &str) -> Option<u64> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    parse_radix(digits, radix)
}

/// Parses a non-empty run of digits in `radix` (10 or 16) with overflow checking.
fn parse_radix(digits: &str, radix: u32) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix)?;
        v = v.checked_mul(u64::from(radix))?.checked_add(u64::from(d))?;
    }
    Some(v)
}

/// Parses a byte size: an integer (see [`parse_u64`]) optionally followed by `K`, `M`, `G` or
/// `T` (binary multiples, case-insensitive), optionally followed by `B` or `iB`.
pub(crate) fn parse_size(text: &str) -> Option<u64> {
    fn unit_shift(text: &str) -> Option<u32> {
        match text.as_bytes().last()?.to_ascii_uppercase() {
            b'K' => Some(10),
            b'M' => Some(20),
            b'G' => Some(30),
            b'T' => Some(40),
            _ => None,
        }
    }
    // "B" is a hexadecimal digit (0x1b): strip a trailing "B"/"iB" only when a unit letter
    // precedes it. K, M, G and T are never digits, so a trailing one is always the unit.
    let without_b = ["iB", "ib", "IB", "Ib", "B", "b"]
        .iter()
        .filter_map(|suffix| text.strip_suffix(suffix))
        .find(|rest| unit_shift(rest).is_some())
        .unwrap_or(text);
    let (number, shift) = match unit_shift(without_b) {
        // The unit letter is ASCII, so slicing one byte off keeps a char boundary.
        Some(shift) => (without_b.get(..without_b.len() - 1)?, shift),
        None => (without_b, 0),
    };
    parse_u64(number)?.checked_mul(1u64 << shift)
}

/// Parses a boolean word.
pub(crate) fn parse_bool(text: &str) -> Option<bool> {
    const ON: [&str; 4] = ["on", "yes", "true", "1"];
    const OFF: [&str; 4] = ["off", "no", "false", "0"];
    if ON.iter().any(|w| w.eq_ignore_ascii_case(text)) {
        Some(true)
    } else if OFF.iter().any(|w| w.eq_ignore_ascii_case(text)) {
        Some(false)
    } else {
        None
    }
}

/// Formats a byte count with the largest binary unit that divides it exactly (`64M`, `1G`,
/// `4K`, `123`): the same spelling the parser accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeDisplay(pub u64);

impl fmt::Display for SizeDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u32, char); 4] = [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')];
        let v = self.0;
        if v != 0 {
            for (shift, unit) in UNITS {
                if v.trailing_zeros() >= shift {
                    return write!(f, "{}{}", v >> shift, unit);
                }
            }
        }
        write!(f, "{v}")
    }
}

/// A PCI function address: `moat_pci::Bdf`, the one the hypervisor uses everywhere.
pub use moat_pci::Bdf;

/// `0000:00:00.0` (the filler of unused device slots).
pub const BDF_ZERO: Bdf = match Bdf::new(0, 0, 0) {
    Some(b) => b,
    None => panic!("00:00.0 is a valid address"),
};

/// Parses `[segment:]bus:device.function` (hexadecimal, at most 4/2/2/1 digits).
pub fn parse_bdf(text: &str) -> Option<Bdf> {
    let (rest, function) = text.rsplit_once('.')?;
    let mut parts = rest.rsplitn(3, ':');
    let device = parts.next()?;
    let bus = parts.next()?;
    let segment = parts.next();
    let field = |s: &str, max_digits: usize| -> Option<u64> {
        if s.len() > max_digits {
            return None;
        }
        parse_radix(s, 16)
    };
    let segment = match segment {
        Some(s) => u16::try_from(field(s, 4)?).ok()?,
        None => 0,
    };
    let bus = u8::try_from(field(bus, 2)?).ok()?;
    let device = u8::try_from(field(device, 2)?).ok()?;
    let function = u8::try_from(field(function, 1)?).ok()?;
    Bdf::with_segment(segment, bus, device, function)
}
