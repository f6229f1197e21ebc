//! The option table: every command-line option, its value kind, default and description.

use crate::value::ValueKind;

/// Declares a closed set of words as an enum, with the word table the option table uses.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in the order of [`Self::NAMES`].
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The command-line spelling of every value, in the order of [`Self::ALL`].
            pub const NAMES: &'static [&'static str] = &[$($word),+];

            /// The command-line spelling of this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $word, )+
                }
            }

            /// The value spelled `word` (ASCII case-insensitive).
            pub fn from_name(word: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str().eq_ignore_ascii_case(word))
            }

            /// The value at `index` in [`Self::ALL`].
            pub(crate) fn from_index(index: usize) -> Option<Self> {
                Self::ALL.get(index).copied()
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice! {
    /// Console log level (`log=`): messages above it are not printed.
    pub enum LogLevel {
        /// Nothing at all.
        Off = "off",
        /// Errors only.
        Error = "error",
        /// Errors and warnings.
        Warn = "warn",
        /// The normal boot log.
        Info = "info",
        /// Debugging detail.
        Debug = "debug",
        /// Everything.
        Trace = "trace",
    }
}

choice! {
    /// What the hypervisor does when its work is done (`exit=`).
    pub enum ExitAction {
        /// Halt all CPUs forever.
        Halt = "halt",
        /// Leave QEMU through the isa-debug-exit device at I/O port 0xf4.
        Qemu = "qemu",
    }
}

choice! {
    /// A self-test run after boot (`selftest=`): a deliberate fault to test the exception path
    /// (selftest builds only), or a hardware test that drives devices and checks the effects.
    pub enum SelfTest {
        /// No self-test.
        None = "none",
        /// Invalid opcode (#UD, vector 6).
        Ud = "ud",
        /// Page fault (#PF, vector 14).
        Pf = "pf",
        /// General protection fault (#GP, vector 13).
        Gp = "gp",
        /// Divide error (#DE, vector 0).
        De = "de",
        /// Breakpoint (#BP, vector 3).
        Bp = "bp",
        /// A Rust panic.
        Panic = "panic",
        /// An arithmetic overflow on a value the compiler cannot see: must panic (the test
        /// kernel is built with overflow checks), not wrap.
        Overflow = "overflow",
        /// Makes a page in the middle of the kernel's text writable, then runs the W^X
        /// self-check again: it must find the page and fail the run.
        Wx = "wx",
        /// VT-d with the edu DMA engine: mapped DMA both ways, faults, stale IOTLB vs flush,
        /// superpages, unattached and foreign devices blocked.
        Vtd = "vtd",
        /// VT-d fault storm: every edu device DMAs to unmapped IOVAs; faults recorded or counted.
        VtdStorm = "vtd-storm",
        /// Puts the BSP's local APIC in x2APIC mode before the hypervisor first uses it, as
        /// firmware that hands over with `IA32_APIC_BASE.EXTD` set does; boot (APs included)
        /// must then go through the x2APIC MSRs.
        X2apic = "x2apic",
        /// Intel VMX: the first vCPU entered gets an invalid guest state (RFLAGS.VM in 64-bit
        /// mode), the second a reserved pin-based control bit; both entries must fail with a
        /// decoded line and stop only their guest (selftest builds only).
        VmxEntry = "vmx-entry",
    }
}

choice! {
    /// Raw tables to hex-dump on the console for debugging (`dump=`).
    pub enum Dump {
        /// Dump nothing.
        None = "none",
        /// Dump the ACPI DMAR table.
        Dmar = "dmar",
    }
}

choice! {
    /// How a guest's DMA is protected by the IOMMU (`guest=...,policy=`).
    pub enum DmaPolicy {
        /// Guest memory direct-mapped: isolation between guests only.
        Passthrough = "passthrough",
        /// Invalidate and wait on every unmap.
        Strict = "strict",
        /// Strict at multicall granularity: one invalidation and one wait per batch.
        Batched = "batched",
        /// Flush queue with a bounded window (lazy / optimistic teardown).
        Deferred = "deferred",
    }
}

/// Maximum number of `guest=` options.
pub const MAX_GUESTS: usize = 4;
/// Maximum number of devices assigned to one guest.
pub const MAX_GUEST_DEVICES: usize = 8;
/// Maximum length of a guest name in bytes.
pub const MAX_GUEST_NAME: usize = 16;
/// Largest CPU count accepted by `smp=` and `guest=...,cpus=`.
pub const MAX_CPUS: u64 = 256;

/// Identifies an option or a field, so the parser can store a parsed value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Key {
    Log,
    Smp,
    Iommu,
    /// `unsafe-interrupts=`.
    UnsafeInterrupts,
    Exit,
    SelfTest,
    Dump,
    Guest,
    GuestName,
    GuestMem,
    GuestCpus,
    GuestDev,
    GuestPolicy,
}

/// One entry of the option table (or of the field table of a structured option).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionSpec {
    /// Name on the command line (compared ASCII case-insensitively).
    pub name: &'static str,
    /// Accepted values.
    pub kind: ValueKind,
    /// Default, as it would be written on the command line (empty when there is none).
    pub default: &'static str,
    /// One-line description.
    pub help: &'static str,
    /// Whether the option may be given several times, each occurrence adding an item
    /// (otherwise a repeated option is reported and the last valid value wins).
    pub repeatable: bool,
    pub(crate) key: Key,
}

const GUEST_DEV_KIND: ValueKind = ValueKind::Bdf;

/// Fields of `guest=`, in the order [`Config`](crate::Config)'s display writes them.
pub static GUEST_FIELDS: &[OptionSpec] = &[
    OptionSpec {
        name: "name",
        kind: ValueKind::Name {
            max_len: MAX_GUEST_NAME,
        },
        default: "g<index>",
        help: "guest name, unique (defaults to g0, g1, ... by position)",
        repeatable: false,
        key: Key::GuestName,
    },
    OptionSpec {
        name: "mem",
        kind: ValueKind::Size {
            min: 1 << 20,
            max: 1 << 40,
            align: 4096,
        },
        default: "64M",
        help: "guest RAM size",
        repeatable: false,
        key: Key::GuestMem,
    },
    OptionSpec {
        name: "cpus",
        kind: ValueKind::Int {
            min: 1,
            max: MAX_CPUS,
            word: None,
        },
        default: "1",
        help: "number of virtual CPUs",
        repeatable: false,
        key: Key::GuestCpus,
    },
    OptionSpec {
        name: "dev",
        kind: ValueKind::List {
            item: &GUEST_DEV_KIND,
            sep: '+',
            max: MAX_GUEST_DEVICES,
        },
        default: "",
        help: "PCI devices assigned to the guest (repeat dev= or join with '+')",
        repeatable: true,
        key: Key::GuestDev,
    },
    OptionSpec {
        name: "policy",
        kind: ValueKind::Choice(DmaPolicy::NAMES),
        default: "strict",
        help: "DMA protection policy",
        repeatable: false,
        key: Key::GuestPolicy,
    },
];

/// Every top-level option, in the order [`Config::settings`](crate::Config::settings) yields
/// them.
pub static OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "log",
        kind: ValueKind::Choice(LogLevel::NAMES),
        default: "info",
        help: "console log level",
        repeatable: false,
        key: Key::Log,
    },
    OptionSpec {
        name: "smp",
        kind: ValueKind::Int {
            min: 1,
            max: MAX_CPUS,
            word: Some("all"),
        },
        default: "all",
        help: "maximum number of CPUs to bring up",
        repeatable: false,
        key: Key::Smp,
    },
    OptionSpec {
        name: "iommu",
        kind: ValueKind::Bool,
        default: "on",
        help: "use the VT-d IOMMU",
        repeatable: false,
        key: Key::Iommu,
    },
    OptionSpec {
        name: "unsafe-interrupts",
        kind: ValueKind::Bool,
        default: "off",
        help: "assign devices even when their IOMMU unit does not remap interrupts (a guest's device can then raise any host interrupt)",
        repeatable: false,
        key: Key::UnsafeInterrupts,
    },
    OptionSpec {
        name: "exit",
        kind: ValueKind::Choice(ExitAction::NAMES),
        default: "halt",
        help: "when done: halt forever, or leave QEMU through isa-debug-exit (port 0xf4)",
        repeatable: false,
        key: Key::Exit,
    },
    OptionSpec {
        name: "selftest",
        kind: ValueKind::Choice(SelfTest::NAMES),
        default: "none",
        help: "raise a deliberate fault after boot (test builds)",
        repeatable: false,
        key: Key::SelfTest,
    },
    OptionSpec {
        name: "dump",
        kind: ValueKind::Choice(Dump::NAMES),
        default: "none",
        help: "hex-dump raw firmware tables",
        repeatable: false,
        key: Key::Dump,
    },
    OptionSpec {
        name: "guest",
        kind: ValueKind::Record(GUEST_FIELDS),
        default: "",
        help: "define a guest (repeatable, up to 4)",
        repeatable: true,
        key: Key::Guest,
    },
];

/// Looks `name` up in `table` (ASCII case-insensitive).
pub(crate) fn lookup(
    table: &'static [OptionSpec],
    name: &str,
) -> Option<(usize, &'static OptionSpec)> {
    table
        .iter()
        .enumerate()
        .find(|(_, spec)| spec.name.eq_ignore_ascii_case(name))
}
