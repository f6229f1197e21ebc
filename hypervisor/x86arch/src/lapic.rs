//! A virtual local APIC in x2APIC mode, as a pure state machine: the interrupt request and
//! in-service registers as 256-bit vector sets with the architectural priority rules (the
//! highest pending vector whose priority class is above the processor priority is the one
//! offered; EOI retires the highest in-service vector), TPR/PPR, the software-enable bit,
//! the error status register, self-IPIs, and the one-shot / periodic timer computed from the
//! guest's TSC. Every register is reached through the x2APIC MSR interface
//! ([`LocalApic::read_msr`] / [`LocalApic::write_msr`]); an access the hardware refuses
//! (a read-only or reserved register written, a write-only one read, a reserved bit set, an
//! x2APIC MSR while the APIC is not in x2APIC mode, an invalid `IA32_APIC_BASE` transition)
//! is a [`Gp`] for the caller to inject into the guest.
//!
//! Not modelled: the xAPIC MMIO page (a guest must switch to x2APIC mode to program the
//! APIC; in xAPIC mode the APIC is enabled but cannot be software-enabled, so it delivers
//! nothing), TSC-deadline timer mode (not advertised, its mode bit is reserved), IPI delivery
//! modes other than fixed (lowest priority, SMI, NMI, INIT, SIPI: ignored and counted, see
//! [`LocalApic::destinations`]), level-triggered interrupts (TMR reads zero), the thermal /
//! performance / LINT / error LVT sources (their registers hold what is written).
//!
//! # IPIs
//!
//! The APIC knows the IDs of its group (the guest's vCPUs, IDs `0..n`, [`LocalApic::in_group`]).
//! A fixed ICR write names its destinations by shorthand, physical ID (0xffff_ffff: all) or
//! logical cluster/bitmap; its own ID among them is a self-IPI into its IRR, and the others
//! are left as an [`Ipi`] for the caller to raise on those APICs ([`LocalApic::take_ipi`]).
//!
//! # The timer's clock
//!
//! The timer counts a virtual crystal clock of TSC / [`TSC_PER_TICK`] Hz, divided by the
//! divide configuration register. The hypervisor reports it as a guest's CPUID leaf 0x15
//! (crystal Hz in ECX, TSC/crystal = [`TSC_PER_TICK`] / 1), as Intel parts do for their
//! APIC timer. A count of `n` at divide `d` expires `n * d * TSC_PER_TICK` TSC cycles after
//! the initial-count write.

/// Declares documented constants of one type, one line each (`NAME = value, "doc";`).
macro_rules! consts {
    ($t:ty: $($name:ident = $v:expr, $doc:literal;)*) => {
        $(#[doc = $doc] pub const $name: $t = $v;)*
    };
}

/// TSC cycles per tick of the timer's input clock (before the divide configuration).
pub const TSC_PER_TICK: u64 = 64;
/// Vectors below this are illegal for fixed interrupts (an error is recorded instead).
pub const FIRST_LEGAL_VECTOR: u8 = 16;

/// The x2APIC MSRs (and `IA32_APIC_BASE`).
pub mod msr {
    consts! { u32:
        APIC_BASE = 0x1b, "`IA32_APIC_BASE`.";
        X2APIC_FIRST = 0x800, "First MSR of the x2APIC range.";
        X2APIC_LAST = 0x8ff, "Last MSR of the x2APIC range.";
        ID = 0x802, "Local APIC ID (read only).";
        VERSION = 0x803, "Version (read only).";
        TPR = 0x808, "Task priority.";
        PPR = 0x80a, "Processor priority (read only).";
        EOI = 0x80b, "End of interrupt (write only, value 0).";
        LDR = 0x80d, "Logical destination (read only in x2APIC mode).";
        SVR = 0x80f, "Spurious-interrupt vector register (bit 8: APIC software enable).";
        ISR0 = 0x810, "In-service register, bits 0-31 (8 MSRs, read only).";
        TMR0 = 0x818, "Trigger-mode register, bits 0-31 (8 MSRs, read only).";
        IRR0 = 0x820, "Interrupt request register, bits 0-31 (8 MSRs, read only).";
        ESR = 0x828, "Error status (write 0 to latch the errors seen since the last write).";
        ICR = 0x830, "Interrupt command register (64 bits).";
        LVT_TIMER = 0x832, "LVT timer.";
        LVT_THERMAL = 0x833, "LVT thermal sensor.";
        LVT_PMI = 0x834, "LVT performance-monitoring counters.";
        LVT_LINT0 = 0x835, "LVT LINT0.";
        LVT_LINT1 = 0x836, "LVT LINT1.";
        LVT_ERROR = 0x837, "LVT error.";
        TIMER_INITIAL = 0x838, "Timer initial count.";
        TIMER_CURRENT = 0x839, "Timer current count (read only).";
        TIMER_DIVIDE = 0x83e, "Timer divide configuration.";
        SELF_IPI = 0x83f, "Self IPI (write only): bits 7:0 are the vector.";
    }
}

/// `IA32_APIC_BASE` fields.
pub mod base {
    consts! { u64:
        ADDRESS = 0xfee0_0000, "The APIC's xAPIC MMIO base (not relocatable here).";
        BSP = 1 << 8, "This is the bootstrap processor (read only).";
        EXTD = 1 << 10, "x2APIC mode.";
        EN = 1 << 11, "APIC global enable.";
    }
}

consts! { u32:
    LVT_VECTOR = 0xff, "LVT: the vector.";
    LVT_PENDING = 1 << 12, "LVT: delivery status (read only; ignored when written).";
    LVT_MASKED = 1 << 16, "LVT: masked.";
    LVT_PERIODIC = 1 << 17, "LVT timer: periodic (bits 18:17 = 01; TSC deadline is not offered).";
    SVR_ENABLE = 1 << 8, "SVR bit 8: APIC software enable.";
    ESR_SEND_ILLEGAL = 1 << 5, "ESR bit 5: a self-IPI / ICR named an illegal vector.";
    ESR_RECEIVE_ILLEGAL = 1 << 6, "ESR bit 6: an illegal vector arrived (an LVT or a raise).";
    VERSION = 0x0005_0014, "Version 0x14, six LVT entries, no EOI-broadcast suppression.";
}

/// The access is refused as the hardware refuses it: inject #GP(0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gp;

/// 256 vectors as a bit set (the IRR / ISR layout: vector `v` is bit `v % 64` of word
/// `v / 64`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VectorSet(pub [u64; 4]);

impl VectorSet {
    /// Adds `v`; `false` when it was already there.
    pub fn insert(&mut self, v: u8) -> bool {
        let (w, b) = (usize::from(v / 64), 1u64 << (v % 64));
        let new = self.0[w] & b == 0;
        self.0[w] |= b;
        new
    }

    /// Removes `v`.
    pub fn remove(&mut self, v: u8) {
        self.0[usize::from(v / 64)] &= !(1u64 << (v % 64));
    }

    /// Whether `v` is in the set.
    pub fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v / 64)] & (1u64 << (v % 64)) != 0
    }

    /// The highest vector in the set.
    pub fn highest(&self) -> Option<u8> {
        self.0
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| (i * 64 + 63 - w.leading_zeros() as usize) as u8)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// Bits `32 * i .. 32 * i + 32` (the register layout of ISR/IRR `i`, `i < 8`).
    pub fn word32(&self, i: usize) -> u32 {
        (self.0[i / 2] >> (32 * (i % 2))) as u32
    }
}

/// The global state of `IA32_APIC_BASE` (EN, EXTD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// EN clear: the APIC neither accepts nor delivers interrupts.
    Disabled,
    /// EN set, EXTD clear (the reset state): registers through MMIO, which is not modelled.
    XApic,
    /// EN and EXTD set: registers through the x2APIC MSRs.
    X2Apic,
}

/// A running timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timer {
    /// TSC of the next expiry.
    next: u64,
    /// TSC cycles per count (the input clock divided by the divide configuration).
    scale: u64,
}

/// What the APIC has done, for the log and the scenarios.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Fixed interrupts accepted into the IRR from outside (device MSIs, fault ring).
    pub raised: u64,
    /// Interrupts the processor took (moved from IRR to ISR).
    pub delivered: u64,
    /// EOIs written.
    pub eois: u64,
    /// Timer expiries (masked ones included).
    pub timer_expiries: u64,
    /// Periodic expiries that passed while an earlier one was not yet noticed (merged).
    pub timer_merged: u64,
    /// Self-IPIs sent (SELF IPI register or ICR to self).
    pub self_ipis: u64,
    /// Interrupts dropped: illegal vector or APIC disabled.
    pub dropped: u64,
    /// Fixed IPIs sent to other APICs of the group (one per destination APIC).
    pub ipis_sent: u64,
    /// ICR writes ignored: a delivery mode other than fixed, or no APIC of the group named.
    pub ipis_ignored: u64,
}

/// A fixed interrupt an ICR write sends to other APICs of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipi {
    /// The vector (legal: 16 or above).
    pub vector: u8,
    /// The destination APIC IDs (bit `i`: ID `i`), never the sender's own.
    pub targets: u64,
}

impl Ipi {
    /// The destination APIC IDs, lowest first.
    pub fn targets(&self) -> impl Iterator<Item = u32> + '_ {
        (0..64).filter(move |i| self.targets & (1 << i) != 0)
    }
}

/// ICR fields.
pub mod icr {
    consts! { u64:
        DELIVERY_MODE = 7 << 8, "Delivery mode (bits 10:8; 0 = fixed).";
        LOGICAL = 1 << 11, "Destination mode: logical.";
        SHORTHAND = 3 << 18, "Destination shorthand (bits 19:18).";
    }
    // The shorthands.
    consts! { u64:
        SHORTHAND_SELF = 1 << 18, "Shorthand: self.";
        SHORTHAND_ALL = 2 << 18, "Shorthand: all including self.";
        SHORTHAND_OTHERS = 3 << 18, "Shorthand: all excluding self.";
    }
    /// The destination field (bits 63:32).
    pub const fn destination(icr: u64) -> u32 {
        (icr >> 32) as u32
    }
    /// Physical destination naming every APIC (x2APIC broadcast).
    pub const BROADCAST: u32 = u32::MAX;
}

/// One virtual local APIC.
#[derive(Debug, Clone)]
pub struct LocalApic {
    id: u32,
    bsp: bool,
    mode: Mode,
    irr: VectorSet,
    isr: VectorSet,
    tpr: u8,
    svr: u32,
    esr: u32,
    /// Errors since the last ESR write.
    esr_pending: u32,
    icr: u64,
    /// Timer, thermal, PMI, LINT0, LINT1, error.
    lvt: [u32; 6],
    divide: u32,
    initial: u32,
    timer: Option<Timer>,
    counts: Counts,
    /// The APIC IDs of the group (bit `i`: ID `i`).
    group: u64,
    /// An IPI written to the ICR and not yet taken by the caller.
    outgoing: Option<Ipi>,
}

/// Index of each LVT register in [`LocalApic::lvt`] and its writable bits.
const LVTS: [(u32, u32); 6] = [
    (
        msr::LVT_TIMER,
        0xff | LVT_PENDING | LVT_MASKED | LVT_PERIODIC,
    ),
    // Vector, delivery mode, mask.
    (msr::LVT_THERMAL, 0x7ff | LVT_PENDING | LVT_MASKED),
    (msr::LVT_PMI, 0x7ff | LVT_PENDING | LVT_MASKED),
    // Vector, delivery mode, polarity, remote IRR, trigger mode, mask.
    (msr::LVT_LINT0, 0x7ff | LVT_PENDING | 0xe000 | LVT_MASKED),
    (msr::LVT_LINT1, 0x7ff | LVT_PENDING | 0xe000 | LVT_MASKED),
    (msr::LVT_ERROR, 0xff | LVT_PENDING | LVT_MASKED),
];

/// Writable bits of the ICR: vector, delivery mode, destination mode, level, trigger,
/// shorthand, destination.
const ICR_WRITABLE: u64 = 0xffff_ffff_000c_cfff;

impl LocalApic {
    /// The APIC of the processor with x2APIC ID `id` (`bsp`: the bootstrap processor), in
    /// its reset state: enabled in xAPIC mode, software-disabled, every LVT masked.
    pub fn new(id: u32, bsp: bool) -> Self {
        LocalApic {
            id,
            bsp,
            mode: Mode::XApic,
            irr: VectorSet::default(),
            isr: VectorSet::default(),
            tpr: 0,
            svr: 0xff,
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [LVT_MASKED; 6],
            divide: 0,
            initial: 0,
            timer: None,
            counts: Counts::default(),
            group: if id < 64 { 1 << id } else { 0 },
            outgoing: None,
        }
    }

    /// The same APIC in a group of `n` APICs with IDs `0..n` (at most 64): the APICs its
    /// IPIs can reach.
    pub fn in_group(mut self, n: u32) -> Self {
        self.group = if n >= 64 { u64::MAX } else { (1 << n) - 1 };
        self
    }

    /// Back to the reset state (keeping the ID, the group and the counts), with `mode`.
    fn reset(&mut self, mode: Mode) {
        let (counts, group) = (self.counts, self.group);
        *self = LocalApic::new(self.id, self.bsp);
        self.mode = mode;
        self.counts = counts;
        self.group = group;
    }

    /// The mode `IA32_APIC_BASE` selects.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// What the APIC has done.
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Whether the APIC is software-enabled (SVR bit 8) and globally enabled.
    pub fn enabled(&self) -> bool {
        self.mode != Mode::Disabled && self.svr & SVR_ENABLE != 0
    }

    /// The pending (IRR) vectors.
    pub fn irr(&self) -> VectorSet {
        self.irr
    }

    /// The in-service (ISR) vectors.
    pub fn isr(&self) -> VectorSet {
        self.isr
    }

    /// The task priority.
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// CR8 as the guest reads it (TPR bits 7:4).
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// A MOV to CR8 (in any APIC mode): TPR bits 7:4 = `value`, bits 3:0 cleared; a value
    /// above 15 sets reserved bits (#GP).
    pub fn set_cr8(&mut self, value: u64) -> Result<(), Gp> {
        if value > 15 {
            return Err(Gp);
        }
        self.tpr = (value as u8) << 4;
        Ok(())
    }

    /// The processor priority: the task priority, or the class of the highest in-service
    /// vector when that is higher.
    pub fn ppr(&self) -> u8 {
        let isrv = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= isrv >> 4 {
            self.tpr
        } else {
            isrv & 0xf0
        }
    }

    fn error(&mut self, bit: u32) {
        self.esr_pending |= bit;
        self.counts.dropped += 1;
    }

    /// Accepts fixed interrupt `vector` into the IRR (an interrupt from outside: a device's
    /// MSI, the fault ring). Refused (`false`) while the APIC is globally disabled or for an
    /// illegal vector (< 16: recorded in the ESR). A vector already pending merges.
    pub fn raise(&mut self, vector: u8) -> bool {
        if self.mode == Mode::Disabled {
            self.counts.dropped += 1;
            return false;
        }
        if vector < FIRST_LEGAL_VECTOR {
            self.error(ESR_RECEIVE_ILLEGAL);
            return false;
        }
        self.counts.raised += 1;
        self.irr.insert(vector);
        true
    }

    /// A local source (timer, self-IPI) asserts `vector`.
    fn assert_local(&mut self, vector: u8, illegal: u32) {
        if vector < FIRST_LEGAL_VECTOR {
            self.error(illegal);
        } else {
            self.irr.insert(vector);
        }
    }

    /// The vector to deliver now: the highest pending one, if its priority class is above
    /// the processor priority and the APIC is enabled. Whether the processor can take it
    /// (RFLAGS.IF, interrupt shadow) is the caller's matter.
    pub fn deliverable(&self) -> Option<u8> {
        if !self.enabled() {
            return None;
        }
        let v = self.irr.highest()?;
        (v >> 4 > self.ppr() >> 4).then_some(v)
    }

    /// The processor took `vector` (it was [`LocalApic::deliverable`]): it moves from the IRR
    /// to the ISR.
    pub fn acknowledge(&mut self, vector: u8) {
        if self.irr.contains(vector) {
            self.irr.remove(vector);
            self.isr.insert(vector);
            self.counts.delivered += 1;
        }
    }

    fn eoi(&mut self) {
        if let Some(v) = self.isr.highest() {
            self.isr.remove(v);
        }
        self.counts.eois += 1;
    }

    /// TSC cycles per timer count at the current divide configuration.
    fn scale(&self) -> u64 {
        let code = ((self.divide >> 1) & 4) | (self.divide & 3);
        let divisor = if code == 7 { 1 } else { 2u64 << code };
        divisor * TSC_PER_TICK
    }

    fn periodic(&self) -> bool {
        self.lvt[0] & LVT_PERIODIC != 0
    }

    /// The timer's period in TSC cycles (periodic mode).
    fn period(&self, t: &Timer) -> u64 {
        u64::from(self.initial) * t.scale
    }

    /// The timer's current count at TSC `now`.
    pub fn current_count(&self, now: u64) -> u32 {
        let Some(t) = self.timer else {
            return 0;
        };
        let next = if now < t.next {
            t.next
        } else if self.periodic() {
            let period = self.period(&t).max(1);
            t.next + ((now - t.next) / period + 1) * period
        } else {
            return 0;
        };
        (next - now).div_ceil(t.scale).min(u64::from(self.initial)) as u32
    }

    /// When the host must have the guest's attention for the timer: the TSC of its next
    /// expiry, if it runs unmasked.
    pub fn deadline(&self) -> Option<u64> {
        let t = self.timer?;
        (self.lvt[0] & LVT_MASKED == 0).then_some(t.next)
    }

    /// Advances the timer to TSC `now`: an expiry at or before `now` sets the LVT timer's
    /// vector in the IRR (unless masked) and stops a one-shot timer or re-arms a periodic one
    /// at its next period (periods that passed unseen merge into one interrupt, as an IRR bit
    /// does). Returns whether the timer expired.
    pub fn poll_timer(&mut self, now: u64) -> bool {
        let Some(mut t) = self.timer else {
            return false;
        };
        if now < t.next {
            return false;
        }
        self.counts.timer_expiries += 1;
        if self.periodic() {
            let period = self.period(&t).max(1);
            let k = (now - t.next) / period + 1;
            self.counts.timer_merged += k - 1;
            t.next += k * period;
            self.timer = Some(t);
        } else {
            self.timer = None;
        }
        if self.lvt[0] & LVT_MASKED == 0 {
            self.assert_local((self.lvt[0] & LVT_VECTOR) as u8, ESR_RECEIVE_ILLEGAL);
        }
        true
    }

    /// Whether an MSR belongs to the APIC (`IA32_APIC_BASE` or the x2APIC range).
    pub fn handles(msr: u32) -> bool {
        msr == msr::APIC_BASE || (msr::X2APIC_FIRST..=msr::X2APIC_LAST).contains(&msr)
    }

    fn base_value(&self) -> u64 {
        let mode = match self.mode {
            Mode::Disabled => 0,
            Mode::XApic => base::EN,
            Mode::X2Apic => base::EN | base::EXTD,
        };
        base::ADDRESS | mode | if self.bsp { base::BSP } else { 0 }
    }

    /// RDMSR of an APIC MSR at TSC `now`.
    pub fn read_msr(&self, m: u32, now: u64) -> Result<u64, Gp> {
        if m == msr::APIC_BASE {
            return Ok(self.base_value());
        }
        if self.mode != Mode::X2Apic {
            return Err(Gp);
        }
        let v: u32 = match m {
            msr::ID => self.id,
            msr::VERSION => VERSION,
            msr::TPR => u32::from(self.tpr),
            msr::PPR => u32::from(self.ppr()),
            // Cluster (ID bits 31:4) in bits 31:16, one bit for ID bits 3:0.
            msr::LDR => (self.id >> 4) << 16 | 1 << (self.id & 0xf),
            msr::SVR => self.svr,
            m if (msr::ISR0..msr::ISR0 + 8).contains(&m) => {
                self.isr.word32((m - msr::ISR0) as usize)
            }
            m if (msr::TMR0..msr::TMR0 + 8).contains(&m) => 0,
            m if (msr::IRR0..msr::IRR0 + 8).contains(&m) => {
                self.irr.word32((m - msr::IRR0) as usize)
            }
            msr::ESR => self.esr,
            msr::ICR => return Ok(self.icr),
            m if (msr::LVT_TIMER..=msr::LVT_ERROR).contains(&m) => {
                self.lvt[(m - msr::LVT_TIMER) as usize]
            }
            msr::TIMER_INITIAL => self.initial,
            msr::TIMER_CURRENT => self.current_count(now),
            msr::TIMER_DIVIDE => self.divide,
            // EOI and SELF IPI are write only; everything else is reserved.
            _ => return Err(Gp),
        };
        Ok(u64::from(v))
    }

    /// WRMSR of an APIC MSR at TSC `now`.
    pub fn write_msr(&mut self, m: u32, value: u64, now: u64) -> Result<(), Gp> {
        if m == msr::APIC_BASE {
            return self.write_base(value);
        }
        if self.mode != Mode::X2Apic {
            return Err(Gp);
        }
        if m == msr::ICR {
            return self.write_icr(value);
        }
        // Every other x2APIC register is 32 bits wide: the upper half is reserved.
        let v = u32::try_from(value).map_err(|_| Gp)?;
        let allowed = |mask: u32| if v & !mask == 0 { Ok(v) } else { Err(Gp) };
        match m {
            msr::TPR => self.tpr = allowed(0xff)? as u8,
            msr::EOI => {
                allowed(0)?;
                self.eoi();
            }
            msr::SVR => {
                // Vector, software enable, focus-processor checking (bit 9, ignored).
                self.svr = allowed(0x3ff)?;
                if self.svr & SVR_ENABLE == 0 {
                    for l in &mut self.lvt {
                        *l |= LVT_MASKED;
                    }
                }
            }
            msr::ESR => {
                allowed(0)?;
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            m if (msr::LVT_TIMER..=msr::LVT_ERROR).contains(&m) => {
                let i = (m - msr::LVT_TIMER) as usize;
                let mut new = allowed(LVTS[i].1)? & !LVT_PENDING;
                if self.svr & SVR_ENABLE == 0 {
                    new |= LVT_MASKED;
                }
                self.lvt[i] = new;
            }
            msr::TIMER_INITIAL => {
                self.initial = v;
                let scale = self.scale();
                self.timer = (v != 0).then(|| Timer {
                    next: now.saturating_add(u64::from(v) * scale),
                    scale,
                });
            }
            msr::TIMER_DIVIDE => {
                let remaining = self.current_count(now);
                self.divide = allowed(0xb)?;
                // A running timer keeps its current count and counts on at the new rate.
                let scale = self.scale();
                if let Some(t) = &mut self.timer {
                    t.scale = scale;
                    t.next = now.saturating_add(u64::from(remaining) * t.scale);
                }
            }
            msr::SELF_IPI => {
                let vector = allowed(0xff)? as u8;
                self.counts.self_ipis += 1;
                self.assert_local(vector, ESR_SEND_ILLEGAL);
            }
            // ID, version, PPR, LDR, ISR, TMR, IRR, current count: read only; the rest
            // of the range is reserved.
            _ => return Err(Gp),
        }
        Ok(())
    }

    /// `IA32_APIC_BASE`: the architectural transitions between disabled, xAPIC and x2APIC
    /// (x2APIC -> xAPIC and disabled -> x2APIC are refused, EXTD without EN is invalid);
    /// the base address cannot move. Disabling resets the APIC.
    fn write_base(&mut self, value: u64) -> Result<(), Gp> {
        // Bits 0-7 and 9 are reserved, and so is any other address.
        if value & 0x2ff != 0 || value & !0xfff != base::ADDRESS {
            return Err(Gp);
        }
        let new = match (value & base::EN != 0, value & base::EXTD != 0) {
            (false, false) => Mode::Disabled,
            (true, false) => Mode::XApic,
            (true, true) => Mode::X2Apic,
            (false, true) => return Err(Gp),
        };
        match (self.mode, new) {
            (Mode::X2Apic, Mode::XApic) | (Mode::Disabled, Mode::X2Apic) => Err(Gp),
            (old, new) if old == new => Ok(()),
            (_, Mode::Disabled) | (Mode::Disabled, _) => {
                self.reset(new);
                Ok(())
            }
            (_, new) => {
                self.mode = new;
                Ok(())
            }
        }
    }

    /// The APIC IDs of the group (this one included when named) that ICR value `value`
    /// names: by shorthand (self, all including self, all excluding self), by physical ID
    /// (0xffff_ffff: all), or logically (x2APIC: cluster in bits 31:16 of the destination,
    /// a bitmap of the cluster's 16 IDs in bits 15:0; this APIC's LDR says the same).
    pub fn destinations(&self, value: u64) -> u64 {
        let me = if self.id < 64 { 1 << self.id } else { 0 };
        let dest = icr::destination(value);
        match value & icr::SHORTHAND {
            icr::SHORTHAND_SELF => me,
            icr::SHORTHAND_ALL => self.group | me,
            icr::SHORTHAND_OTHERS => self.group & !me,
            _ if value & icr::LOGICAL != 0 => {
                (0..64u32)
                    .filter(|i| i >> 4 == dest >> 16 && dest & (1 << (i & 0xf)) != 0)
                    .fold(0, |m, i| m | 1 << i)
                    & (self.group | me)
            }
            _ if dest == icr::BROADCAST => self.group | me,
            _ if dest < 64 => (1 << dest) & (self.group | me),
            _ => 0,
        }
    }

    /// The ICR: a fixed interrupt to the APICs it names ([`LocalApic::destinations`]): this
    /// one's own ID is a self-IPI, the others are left for [`LocalApic::take_ipi`]. An
    /// illegal vector (< 16) sends nothing and sets the ESR's send-illegal-vector bit, as the
    /// hardware does; another delivery mode (lowest priority, SMI, NMI, INIT, SIPI) or a
    /// destination naming no APIC of the group is ignored and counted.
    fn write_icr(&mut self, value: u64) -> Result<(), Gp> {
        if value & !ICR_WRITABLE != 0 {
            return Err(Gp);
        }
        self.icr = value;
        let vector = value as u8;
        if value & icr::DELIVERY_MODE != 0 {
            self.counts.ipis_ignored += 1;
            return Ok(());
        }
        let dests = self.destinations(value);
        if dests == 0 {
            self.counts.ipis_ignored += 1;
            return Ok(());
        }
        if vector < FIRST_LEGAL_VECTOR {
            self.error(ESR_SEND_ILLEGAL);
            return Ok(());
        }
        let me = if self.id < 64 { 1 << self.id } else { 0 };
        if dests & me != 0 {
            self.counts.self_ipis += 1;
            self.irr.insert(vector);
        }
        let others = dests & !me;
        if others != 0 {
            self.counts.ipis_sent += u64::from(others.count_ones());
            self.outgoing = Some(Ipi {
                vector,
                targets: others,
            });
        }
        Ok(())
    }

    /// The IPI the latest ICR write sends to other APICs, for the caller to raise there
    /// (take it after every write: a later ICR write replaces one not taken).
    pub fn take_ipi(&mut self) -> Option<Ipi> {
        self.outgoing.take()
    }
}

#[cfg(test)]
mod tests;
