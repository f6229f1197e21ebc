//! Typed configuration parsed from the hypervisor command line.
//!
//! GRUB hands Moat a command line such as
//! `log=debug smp=2 iommu=on selftest=ud exit=qemu guest=name=g0,mem=64M,dev=00:05.0`.
//! [`Config::parse`] turns it into a [`Config`] plus [`Diagnostics`]. Boot never stops on a
//! bad command line: every problem becomes a typed [`Diagnostic`] (with the valid names or
//! values in its message), the offending token or field is ignored, and the configuration keeps
//! its default (or the previous valid value) for it.
//!
//! # Syntax
//!
//! - Tokens are separated by ASCII whitespace (and NUL); runs of whitespace are fine. Quoting
//!   is not supported nor needed: no value contains a space.
//! - A token is `name=value`; option names and word values are ASCII case-insensitive.
//!   A boolean option given bare (`iommu`) means `on`.
//! - A first token without `=` that starts with `/` or `(` is taken as the kernel image path
//!   some boot loaders prepend, and skipped.
//! - A non-repeatable option given twice: **the last valid value wins** and a
//!   [`Diagnostic::Duplicate`] warning is reported.
//! - `guest=` is repeatable (up to [`MAX_GUESTS`]); its value is comma-separated
//!   `field=value` pairs (see [`GUEST_FIELDS`]). Devices are given with `dev=`, repeated or
//!   joined with `+` (`dev=00:05.0+00:06.0`). A guest with a name already used is ignored; a
//!   device already assigned to an earlier guest stays there.
//!
//! The option table [`OPTIONS`] drives both the parser and the descriptions; [`Config`]'s
//! `Display` writes the effective configuration back as a command line that parses to the
//! same `Config`, and [`Config::settings`] yields it option by option for the boot log.
//!
//! # Example
//!
//! ```
//! use moat_config::{Config, DmaPolicy, LogLevel};
//!
//! let cmdline = "log=debug smp=2 iommu=of guest=name=g0,mem=64M,dev=00:05.0,policy=batched";
//! let config = Config::parse_with(cmdline, |diagnostic| {
//!     // The kernel logs these; boot goes on.
//!     assert_eq!(
//!         diagnostic.to_string(),
//!         "bad value `of` for iommu ignored; expected on or off"
//!     );
//! });
//! assert_eq!(config.log, LogLevel::Debug);
//! assert_eq!(config.smp, Some(2));
//! assert!(config.iommu); // the default, kept
//! assert_eq!(config.guests()[0].policy, DmaPolicy::Batched);
//! for setting in config.settings() {
//!     // "log=debug", "smp=2", ..., "guest=name=g0,mem=64M,cpus=1,dev=00:05.0,policy=batched"
//!     let _line = format!("{setting}  ({})", setting.spec().help);
//! }
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

mod diag;
mod options;
mod value;

use core::fmt;

pub use diag::{Diagnostic, Diagnostics, OptionPath, MAX_DIAGNOSTICS};
pub use options::{
    DmaPolicy, Dump, ExitAction, LogLevel, OptionSpec, SelfTest, GUEST_FIELDS, MAX_CPUS,
    MAX_GUESTS, MAX_GUEST_DEVICES, MAX_GUEST_NAME, OPTIONS,
};
pub use value::{parse_bdf, Bdf, SizeDisplay, ValueKind, BDF_ZERO};

use options::{lookup, Key};
use value::Value;

/// A guest name: 1 to [`MAX_GUEST_NAME`] bytes of ASCII letters, digits, `-`, `_`, `.`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestName {
    bytes: [u8; MAX_GUEST_NAME],
    len: u8,
}

impl GuestName {
    /// Builds a name; `None` when `name` is empty, too long or has other characters.
    pub fn new(name: &str) -> Option<Self> {
        let kind = ValueKind::Name {
            max_len: MAX_GUEST_NAME,
        };
        match kind.parse(name) {
            Some(Value::Name(n)) => Some(Self::from_valid(n)),
            _ => None,
        }
    }

    /// Copies a name already checked against [`ValueKind::Name`].
    fn from_valid(name: &str) -> Self {
        let mut bytes = [0u8; MAX_GUEST_NAME];
        let len = name.len().min(MAX_GUEST_NAME);
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        GuestName {
            bytes,
            len: len as u8,
        }
    }

    /// The default name of the guest at `index`: `g0`, `g1`, ...
    fn positional(index: usize) -> Self {
        let mut bytes = [0u8; MAX_GUEST_NAME];
        bytes[0] = b'g';
        // Write the decimal digits of `index` (at most 20) after the `g`.
        let mut digits = [0u8; 20];
        let mut n = index;
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 || count == digits.len() {
                break;
            }
        }
        let count = count.min(MAX_GUEST_NAME - 1);
        for i in 0..count {
            bytes[1 + i] = digits[count - 1 - i];
        }
        GuestName {
            bytes,
            len: (1 + count) as u8,
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII, so this cannot fail; fall back to "" rather than panic.
        core::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Display for GuestName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for GuestName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// One guest, from a `guest=` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    /// Unique name.
    pub name: GuestName,
    /// RAM size in bytes (a multiple of 4 KiB).
    pub mem: u64,
    /// Number of virtual CPUs.
    pub cpus: u16,
    /// DMA protection policy.
    pub policy: DmaPolicy,
    devices: [Bdf; MAX_GUEST_DEVICES],
    device_count: u8,
}

impl GuestConfig {
    /// Default guest RAM size: 64 MiB.
    pub const DEFAULT_MEM: u64 = 64 << 20;

    /// A guest with the defaults of [`GUEST_FIELDS`] and the given name.
    pub const fn new(name: GuestName) -> Self {
        GuestConfig {
            name,
            mem: Self::DEFAULT_MEM,
            cpus: 1,
            policy: DmaPolicy::Strict,
            devices: [BDF_ZERO; MAX_GUEST_DEVICES],
            device_count: 0,
        }
    }

    /// The PCI devices assigned to this guest, in command-line order, without duplicates.
    pub fn devices(&self) -> &[Bdf] {
        &self.devices[..usize::from(self.device_count)]
    }

    /// Adds a device; `Ok(false)` when it was already there, `Err(())` when full.
    fn add_device(&mut self, bdf: Bdf) -> Result<bool, ()> {
        if self.devices().contains(&bdf) {
            return Ok(false);
        }
        let slot = self
            .devices
            .get_mut(usize::from(self.device_count))
            .ok_or(())?;
        *slot = bdf;
        self.device_count += 1;
        Ok(true)
    }

    fn remove_device(&mut self, bdf: Bdf) {
        let n = usize::from(self.device_count);
        if let Some(i) = self.devices[..n].iter().position(|d| *d == bdf) {
            self.devices.copy_within(i + 1..n, i);
            // The vacated slot goes back to the filler, so equal configurations compare equal.
            self.devices[n - 1] = BDF_ZERO;
            self.device_count -= 1;
        }
    }
}

impl fmt::Display for GuestConfig {
    /// Writes the guest as the value of a `guest=` option.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "name={},mem={},cpus={}",
            self.name,
            SizeDisplay(self.mem),
            self.cpus
        )?;
        for (i, d) in self.devices().iter().enumerate() {
            f.write_str(if i == 0 { ",dev=" } else { "+" })?;
            write!(f, "{d}")?;
        }
        write!(f, ",policy={}", self.policy)
    }
}

/// The hypervisor configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Console log level (`log=`).
    pub log: LogLevel,
    /// Maximum number of CPUs to bring up (`smp=`); `None` means all of them.
    pub smp: Option<u16>,
    /// Whether to use the IOMMU (`iommu=`).
    pub iommu: bool,
    /// Assign devices to guests even when their unit does not remap interrupts
    /// (`unsafe-interrupts`): such a device can then raise any interrupt on the host.
    pub unsafe_interrupts: bool,
    /// What to do when the work is done (`exit=`).
    pub exit: ExitAction,
    /// Deliberate fault for the test build (`selftest=`).
    pub selftest: SelfTest,
    /// Raw tables to dump (`dump=`).
    pub dump: Dump,
    guests: [GuestConfig; MAX_GUESTS],
    guest_count: u8,
}

impl Default for Config {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Config {
    /// The configuration of an empty command line.
    pub const DEFAULT: Config = Config {
        log: LogLevel::Info,
        smp: None,
        iommu: true,
        unsafe_interrupts: false,
        exit: ExitAction::Halt,
        selftest: SelfTest::None,
        dump: Dump::None,
        guests: [GuestConfig::new(GuestName {
            bytes: [0; MAX_GUEST_NAME],
            len: 0,
        }); MAX_GUESTS],
        guest_count: 0,
    };

    /// Parses `cmdline`, collecting up to [`MAX_DIAGNOSTICS`] diagnostics.
    pub fn parse(cmdline: &str) -> (Config, Diagnostics<'_>) {
        let mut diags = Diagnostics::new();
        let config = Self::parse_with(cmdline, |d| diags.push(d));
        (config, diags)
    }

    /// Parses `cmdline`, handing every diagnostic to `report` as it is found (for example to
    /// log it directly). Never fails and never panics.
    pub fn parse_with<'a>(cmdline: &'a str, mut report: impl FnMut(Diagnostic<'a>)) -> Config {
        let mut config = Config::DEFAULT;
        let mut seen = 0u64;
        let tokens = cmdline
            .split(|c: char| c.is_ascii_whitespace() || c == '\0')
            .filter(|t| !t.is_empty());
        for (i, token) in tokens.enumerate() {
            let (name, value) = match token.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (token, None),
            };
            if i == 0 && value.is_none() && (token.starts_with('/') || token.starts_with('(')) {
                continue; // the kernel image path
            }
            let Some((index, spec)) = lookup(OPTIONS, name) else {
                report(Diagnostic::UnknownOption { name });
                continue;
            };
            if !spec.repeatable {
                let bit = 1u64 << (index % 64);
                if seen & bit != 0 {
                    report(Diagnostic::Duplicate {
                        path: OptionPath::option(spec.name),
                    });
                }
                seen |= bit;
            }
            config.apply(spec, value, &mut report);
        }
        config
    }

    /// The guests, in command-line order.
    pub fn guests(&self) -> &[GuestConfig] {
        &self.guests[..usize::from(self.guest_count)]
    }

    /// The effective configuration, one [`Setting`] per option in [`OPTIONS`] order (one per
    /// guest for `guest=`, none when there is no guest).
    pub fn settings(&self) -> impl Iterator<Item = Setting<'_>> + '_ {
        OPTIONS.iter().flat_map(move |spec| {
            let single = match spec.key {
                Key::Guest => None,
                _ => Some(Setting {
                    spec,
                    value: self.scalar_setting(spec.key),
                }),
            };
            let guests = match spec.key {
                Key::Guest => self.guests(),
                _ => &[],
            };
            single
                .into_iter()
                .chain(guests.iter().map(move |g| Setting {
                    spec,
                    value: SettingValue::Guest(g),
                }))
        })
    }

    fn scalar_setting(&self, key: Key) -> SettingValue<'_> {
        match key {
            Key::Log => SettingValue::Word(self.log.as_str()),
            Key::Smp => match self.smp {
                Some(n) => SettingValue::Int(u64::from(n)),
                None => SettingValue::Word("all"),
            },
            Key::Iommu => SettingValue::Word(if self.iommu { "on" } else { "off" }),
            Key::UnsafeInterrupts => {
                SettingValue::Word(if self.unsafe_interrupts { "on" } else { "off" })
            }
            Key::Exit => SettingValue::Word(self.exit.as_str()),
            Key::SelfTest => SettingValue::Word(self.selftest.as_str()),
            Key::Dump => SettingValue::Word(self.dump.as_str()),
            // Not scalar top-level options.
            Key::Guest
            | Key::GuestName
            | Key::GuestMem
            | Key::GuestCpus
            | Key::GuestDev
            | Key::GuestPolicy => SettingValue::Word(""),
        }
    }

    /// Applies one top-level option.
    fn apply<'a>(
        &mut self,
        spec: &'static OptionSpec,
        value: Option<&'a str>,
        report: &mut impl FnMut(Diagnostic<'a>),
    ) {
        let path = OptionPath::option(spec.name);
        let Some(text) = value_or_flag(spec, value) else {
            report(Diagnostic::MissingValue {
                path,
                expected: &spec.kind,
            });
            return;
        };
        if spec.key == Key::Guest {
            self.apply_guest(spec, text, report);
            return;
        }
        match spec.kind.parse(text) {
            Some(v) => self.set(spec.key, v),
            None => report(Diagnostic::BadValue {
                path,
                value: text,
                expected: &spec.kind,
            }),
        }
    }

    /// Stores a parsed top-level scalar.
    fn set(&mut self, key: Key, value: Value<'_>) {
        match (key, value) {
            (Key::Log, Value::Choice(i)) => self.log = LogLevel::from_index(i).unwrap_or(self.log),
            (Key::Smp, Value::Int(n)) => self.smp = n.and_then(|n| u16::try_from(n).ok()),
            (Key::Iommu, Value::Bool(b)) => self.iommu = b,
            (Key::UnsafeInterrupts, Value::Bool(b)) => self.unsafe_interrupts = b,
            (Key::Exit, Value::Choice(i)) => {
                self.exit = ExitAction::from_index(i).unwrap_or(self.exit)
            }
            (Key::SelfTest, Value::Choice(i)) => {
                self.selftest = SelfTest::from_index(i).unwrap_or(self.selftest)
            }
            (Key::Dump, Value::Choice(i)) => self.dump = Dump::from_index(i).unwrap_or(self.dump),
            // The table pairs every key with its kind; other pairs cannot occur.
            _ => {}
        }
    }

    /// Parses one `guest=` value and adds the guest.
    fn apply_guest<'a>(
        &mut self,
        spec: &'static OptionSpec,
        text: &'a str,
        report: &mut impl FnMut(Diagnostic<'a>),
    ) {
        let index = usize::from(self.guest_count);
        if index >= MAX_GUESTS {
            report(Diagnostic::TooMany {
                path: OptionPath::option(spec.name),
                max: MAX_GUESTS,
            });
            return;
        }
        let mut guest = GuestConfig::new(GuestName::positional(index));
        let mut seen = 0u64;
        for field in text.split(',').filter(|f| !f.is_empty()) {
            let (fname, fvalue) = match field.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (field, None),
            };
            let Some((findex, fspec)) = lookup(GUEST_FIELDS, fname) else {
                report(Diagnostic::UnknownField {
                    option: spec.name,
                    field: fname,
                    valid: GUEST_FIELDS,
                });
                continue;
            };
            let path = OptionPath::field(spec.name, fspec.name);
            if !fspec.repeatable {
                let bit = 1u64 << (findex % 64);
                if seen & bit != 0 {
                    report(Diagnostic::Duplicate { path });
                }
                seen |= bit;
            }
            let Some(ftext) = value_or_flag(fspec, fvalue) else {
                report(Diagnostic::MissingValue {
                    path,
                    expected: &fspec.kind,
                });
                continue;
            };
            if let ValueKind::List { item, sep, max } = &fspec.kind {
                for item_text in ftext.split(*sep) {
                    match item.parse(item_text) {
                        Some(Value::Bdf(bdf)) if fspec.key == Key::GuestDev => {
                            if guest.add_device(bdf).is_err() {
                                report(Diagnostic::TooMany { path, max: *max });
                                break;
                            }
                        }
                        _ => report(Diagnostic::BadValue {
                            path,
                            value: item_text,
                            expected: item,
                        }),
                    }
                }
                continue;
            }
            match (fspec.key, fspec.kind.parse(ftext)) {
                (Key::GuestName, Some(Value::Name(n))) => guest.name = GuestName::from_valid(n),
                (Key::GuestMem, Some(Value::Size(s))) => guest.mem = s,
                (Key::GuestCpus, Some(Value::Int(Some(n)))) => {
                    guest.cpus = u16::try_from(n).unwrap_or(guest.cpus)
                }
                (Key::GuestPolicy, Some(Value::Choice(i))) => {
                    guest.policy = DmaPolicy::from_index(i).unwrap_or(guest.policy)
                }
                _ => report(Diagnostic::BadValue {
                    path,
                    value: ftext,
                    expected: &fspec.kind,
                }),
            }
        }
        if self.guests().iter().any(|g| g.name == guest.name) {
            report(Diagnostic::DuplicateGuest { name: guest.name });
            return;
        }
        let requested = guest.devices;
        for &device in &requested[..usize::from(guest.device_count)] {
            if let Some(owner) = self.guests().iter().find(|g| g.devices().contains(&device)) {
                report(Diagnostic::DeviceConflict {
                    device,
                    guest: guest.name,
                    owner: owner.name,
                });
                guest.remove_device(device);
            }
        }
        self.guests[index] = guest;
        self.guest_count += 1;
    }
}

/// The text of an option's value: the given one, or `on` for a bare boolean option.
fn value_or_flag<'a>(spec: &OptionSpec, value: Option<&'a str>) -> Option<&'a str> {
    match (value, spec.kind) {
        (Some(v), _) => Some(v),
        (None, ValueKind::Bool) => Some("on"),
        (None, _) => None,
    }
}

impl fmt::Display for Config {
    /// Writes the effective configuration as a command line (`log=info smp=all ...`), every
    /// option explicit; parsing it gives back the same `Config`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.settings().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// One option of the effective configuration, for printing: `Display` writes `name=value`.
#[derive(Clone, Copy, Debug)]
pub struct Setting<'c> {
    spec: &'static OptionSpec,
    value: SettingValue<'c>,
}

#[derive(Clone, Copy, Debug)]
enum SettingValue<'c> {
    Word(&'static str),
    Int(u64),
    Guest(&'c GuestConfig),
}

impl<'c> Setting<'c> {
    /// The option's table entry (name, kind, default, description).
    pub fn spec(&self) -> &'static OptionSpec {
        self.spec
    }

    /// The option name.
    pub fn name(&self) -> &'static str {
        self.spec.name
    }

    /// The value, as it would be written on the command line.
    pub fn value(&self) -> impl fmt::Display + 'c + use<'c> {
        SettingValueDisplay(self.value)
    }

    /// `true` when the value is the option's default (never for a guest).
    pub fn is_default(&self) -> bool {
        match self.value {
            SettingValue::Word(w) => w == self.spec.default,
            SettingValue::Int(_) | SettingValue::Guest(_) => false,
        }
    }
}

struct SettingValueDisplay<'c>(SettingValue<'c>);

impl fmt::Display for SettingValueDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            SettingValue::Word(w) => f.write_str(w),
            SettingValue::Int(n) => write!(f, "{n}"),
            SettingValue::Guest(g) => write!(f, "{g}"),
        }
    }
}

impl fmt::Display for Setting<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.spec.name, self.value())
    }
}
