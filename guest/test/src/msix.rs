//! MSI-X tests (`msi-x-*`) on the assigned NVMe controller: the guest finds the MSI-X
//! capability in its filtered configuration space, programs entries through the table in
//! BAR0 (which the hypervisor traps and emulates), and gets its I/O completions as
//! interrupts; the attack test writes what a guest should not be able to send.

use core::sync::atomic::Ordering::SeqCst;

use moat_nvme::command::Command;
use moat_nvme::{Done, Request};

use crate::abi::BootInfo;
use crate::irq::{self, AUX_TAKEN, AUX_VECTOR, MSI_VECTOR, STRAY, TAKEN, TAKEN_ON};
use crate::nvme::{self, bytes, data, Setup};
use crate::{pci, println, Outcome};

/// Message address of a fixed, physical-destination MSI to APIC `dest` (compatibility
/// format).
const fn address(dest: u8) -> u32 {
    0xfee0_0000 | (dest as u32) << 12
}

/// The NVMe function's MSI-X capability and where its table and PBA are (identity-mapped).
struct Msix {
    f: pci::Function,
    cap: u8,
    entries: u16,
    table: u64,
    pba: u64,
}

impl Msix {
    /// Finds the capability by walking the (filtered) list; maps the table and PBA.
    fn find() -> Result<Msix, &'static str> {
        let mut found = None;
        pci::scan(|f| {
            if pci::read32(f.bus, f.dev, f.func, 0x08) >> 8 == 0x01_08_02 && found.is_none() {
                found = Some(f);
            }
        });
        let f = found.ok_or("no NVMe controller visible")?;
        let rd = |off: u8| pci::read32(f.bus, f.dev, f.func, off);
        if rd(0x04) & (1 << 20) == 0 {
            return Err("no capability list");
        }
        let mut at = rd(0x34) as u8 & 0xfc;
        let mut hops = 0;
        while at != 0 && rd(at) & 0xff != 0x11 {
            at = (rd(at) >> 8) as u8 & 0xfc;
            hops += 1;
            if hops > 48 {
                return Err("capability list loops");
            }
        }
        if at == 0 {
            return Err("no MSI-X capability visible");
        }
        let entries = ((rd(at) >> 16) & 0x7ff) as u16 + 1;
        let bar = |bir: u32| -> Result<u64, &'static str> {
            let reg = 0x10 + 4 * bir as u8;
            let lo = rd(reg);
            if lo & 1 != 0 {
                return Err("MSI-X structure in an I/O BAR");
            }
            let mut a = u64::from(lo & !0xf);
            if lo & 0x6 == 0x4 {
                a |= u64::from(rd(reg + 4)) << 32;
            }
            Ok(a)
        };
        let (t, p) = (rd(at + 4), rd(at + 8));
        let table = bar(t & 7)? + u64::from(t & !7);
        let pba = bar(p & 7)? + u64::from(p & !7);
        crate::paging::map_mmio(table & !0xfff, 0x1000)?;
        crate::paging::map_mmio(pba & !0xfff, 0x1000)?;
        println!(
            "msi-x: capability at {at:#x}: {entries} entries, table BAR{} +{:#x} at {table:#x}, PBA BAR{} +{:#x} at {pba:#x}",
            t & 7,
            t & !7,
            p & 7,
            p & !7
        );
        Ok(Msix {
            f,
            cap: at,
            entries,
            table,
            pba,
        })
    }

    /// Writes the message control: MSI-X `enable`, function `masked`.
    fn control(&self, enable: bool, masked: bool) {
        let f = self.f;
        let h = pci::read32(f.bus, f.dev, f.func, self.cap) & !(3 << 30);
        let bits = u32::from(enable) << 31 | u32::from(masked) << 30;
        pci::write32(f.bus, f.dev, f.func, self.cap, h | bits);
    }

    fn at(&self, i: u16, word: u64) -> u64 {
        self.table + 16 * u64::from(i) + 4 * word
    }

    /// Writes dword `word` of entry `i`.
    fn write(&self, i: u16, word: u64, value: u32) {
        // SAFETY: the table in the NVMe BAR, identity-mapped uncached (`find`); a dword
        // access the hypervisor emulates.
        unsafe { core::ptr::write_volatile(self.at(i, word) as *mut u32, value) }
    }

    /// Reads dword `word` of entry `i`.
    fn read(&self, i: u16, word: u64) -> u32 {
        // SAFETY: as in `write`.
        unsafe { core::ptr::read_volatile(self.at(i, word) as *const u32) }
    }

    /// Programs entry `i`: a fixed MSI of `vector` to vCPU `dest`, masked or not.
    fn program(&self, i: u16, dest: u8, vector: u8, masked: bool) {
        self.write(i, 3, 1);
        self.write(i, 0, address(dest));
        self.write(i, 1, 0);
        self.write(i, 2, u32::from(vector));
        self.write(i, 3, u32::from(masked));
    }

    fn mask(&self, i: u16, masked: bool) {
        self.write(i, 3, u32::from(masked));
    }

    /// The PBA dword holding entry `i`'s pending bit.
    fn pba_dword(&self, i: u16) -> u32 {
        // SAFETY: the PBA, identity-mapped uncached (`find`), read as an aligned dword.
        unsafe { core::ptr::read_volatile((self.pba + 4 * u64::from(i / 32)) as *const u32) }
    }

    fn pending(&self, i: u16) -> bool {
        self.pba_dword(i) >> (i % 32) & 1 != 0
    }
}

/// One 4 KiB command on vCPU 0's queue at block `blk` of the data area; the completion is
/// reaped by polling when `poll`, else once per call of `reap` (the caller waits for the
/// interrupt in between).
fn submit(s: &mut Setup, write: bool, blk: u64) -> Outcome {
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    let bs = u64::from(q.namespace().block_size);
    let req = Request {
        write,
        lba: blk * 4096 / bs,
        gpa: data(0) + blk * 4096,
        len: 4096,
        tag: blk,
    };
    q.submit(&mut s.p, &mut s.m, &[req])
        .map_err(|_| "NVMe submit failed")
}

/// Takes every posted completion now (no waiting); returns how many, all OK.
fn reap(s: &mut Setup) -> Result<usize, &'static str> {
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    let mut ok = true;
    let n = q
        .reap(&mut s.p, &mut s.m, &mut |d: Done| ok &= d.result.is_ok())
        .map_err(|_| "NVMe reap failed")?;
    if !ok {
        return Err("an NVMe command failed");
    }
    Ok(n)
}

/// Polls until `want` commands completed.
fn poll(s: &mut Setup, want: usize) -> Outcome {
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    nvme::complete(&mut s.p, &mut s.m, q, want)
}

fn pattern(blk: u64, i: usize) -> u8 {
    (blk as u8).wrapping_mul(31) ^ (i as u8).wrapping_mul(7) ^ 0x5a
}

/// `msi-x-nvme=N` (`dest`: the vCPU its I/O queue's entry names): the guest enables MSI-X on
/// its NVMe controller with entry 1 (its I/O completion queue) sending [`MSI_VECTOR`] to
/// `dest` and entry 0 (the admin queue) masked with [`AUX_VECTOR`]; N writes and N reads,
/// one at a time, each waited for by its interrupt (HLT on vCPU 0): exactly one interrupt
/// per completion, the data read back equal. Then the pending bits: an I/O with entry 1
/// masked sets its PBA bit and raises nothing, the unmask delivers it once; the admin
/// completion's bit of entry 0 likewise.
pub fn nvme_irq(info: &BootInfo, n: u64, dest: u8) -> Outcome {
    if usize::from(dest) >= info.vcpus.get() as usize {
        return Err("no such vCPU");
    }
    let m = Msix::find()?;
    if m.entries < 2 {
        return Err("fewer than 2 MSI-X entries");
    }
    irq::load_idt();
    if dest == 1 {
        let end = crate::abi::rdtsc() + 2000 * info.tsc_khz.get();
        while !irq::WORKER_READY.load(SeqCst) && crate::abi::rdtsc() < end {
            core::hint::spin_loop();
        }
    }
    // The controller accepts a completion queue's interrupt vector only with MSI-X on:
    // enabled first, every entry masked, then the queues created.
    m.program(0, 0, AUX_VECTOR, true);
    m.program(1, dest, MSI_VECTOR, true);
    m.control(true, false);
    let mut s = nvme::setup_with(info, true)?;
    m.mask(1, false);
    let back = [m.read(1, 0), m.read(1, 1), m.read(1, 2), m.read(1, 3)];
    if back != [address(dest), 0, u32::from(MSI_VECTOR), 0] {
        println!("msi-x-nvme: entry 1 reads back {back:x?}");
        return Err("the MSI-X entry did not read back");
    }
    crate::idt::sti();
    let on = usize::from(dest);
    let mut missed = 0u64;
    let mut batches = 0u64;
    for i in 0..2 * n {
        let (write, blk) = (i < n, i % n);
        let buf = bytes(data(0) + blk * 4096, 4096);
        for (k, b) in buf.iter_mut().enumerate() {
            *b = if write { pattern(blk, k) } else { 0 };
        }
        let before = TAKEN_ON[on].load(SeqCst);
        submit(&mut s, write, blk)?;
        if !irq::wait_taken(info, on, before + 1, 2000, dest == 0) {
            println!("msi-x-nvme: I/O {i}: no interrupt within 2 s");
            missed += 1;
            poll(&mut s, 1)?;
            continue;
        }
        // The device posts the completion before it signals.
        match reap(&mut s)? {
            1 => batches += 1,
            got => {
                println!("msi-x-nvme: I/O {i}: {got} completion(s) at its interrupt");
                poll(&mut s, 1)?;
            }
        }
    }
    let differ: usize = (0..n)
        .map(|blk| {
            let buf = bytes(data(0) + blk * 4096, 4096);
            buf.iter()
                .enumerate()
                .filter(|&(k, &b)| b != pattern(blk, k))
                .count()
        })
        .sum();
    // Anything late or doubled would arrive now.
    crate::dma::delay_ms(info, 300);
    let taken = TAKEN_ON[on].load(SeqCst);
    let (stray, aux) = (STRAY.load(SeqCst), AUX_TAKEN.load(SeqCst));
    println!(
        "msi-x-nvme: {} I/O(s) with completion interrupt to vcpu {dest}: {taken} interrupt(s) on vector {MSI_VECTOR:#x} on vcpu {dest}, {batches} with exactly one completion, {stray} stray, {aux} on {AUX_VECTOR:#x}, {missed} missed; {differ} byte(s) differ",
        2 * n
    );
    let (_, cost_min, cost_mean) = irq::COST.summary();
    println!(
        "msi-x-nvme: host handler -> guest handler: min {cost_min} cycles, mean {cost_mean} cycles (TSC {} MHz)",
        info.tsc_khz.get() / 1000
    );
    let mut failures = u32::from(
        taken != 2 * n || batches != 2 * n || stray != 0 || aux != 0 || missed != 0 || differ != 0,
    );

    // Entry 1 masked: the completion raises nothing and leaves its pending bit; the unmask
    // delivers it, once.
    m.mask(1, true);
    let before = TAKEN_ON[on].load(SeqCst);
    submit(&mut s, false, 0)?;
    poll(&mut s, 1)?;
    crate::dma::delay_ms(info, 50);
    let (during, pend) = (TAKEN_ON[on].load(SeqCst) - before, m.pending(1));
    m.mask(1, false);
    let _ = irq::wait_taken(info, on, before + 1, 2000, dest == 0);
    crate::dma::delay_ms(info, 100);
    let (after, pend_after) = (TAKEN_ON[on].load(SeqCst) - before, m.pending(1));
    let ok = during == 0 && pend && after == 1 && !pend_after;
    failures += report(
        ok,
        format_args!(
            "msi-x-nvme: entry 1 masked: I/O completed, {during} interrupt(s), PBA bit {}; unmasked: {after} interrupt(s) in all, PBA bit {}",
            u8::from(pend),
            u8::from(pend_after),
        ),
    );

    // Entry 0 (the admin queue's, masked from the start): its completions (the set-up's and
    // one more admin command's) leave its pending bit; the unmask delivers AUX_VECTOR once.
    let _ = s.ctrl.admin(&mut s.p, Command::set_queue_count(1, 1));
    crate::dma::delay_ms(info, 50);
    let (pend0, aux0) = (m.pending(0), AUX_TAKEN.load(SeqCst));
    m.mask(0, false);
    crate::dma::delay_ms(info, 100);
    let (aux1, pend0_after) = (AUX_TAKEN.load(SeqCst), m.pending(0));
    let (bit, bit_after) = (u8::from(pend0), u8::from(pend0_after));
    failures += report(
        bit == 1 && aux0 == 0 && aux1 == 1 && bit_after == 0,
        format_args!("msi-x-nvme: admin completion with entry 0 masked: PBA bit {bit}, {aux0} interrupt(s) on {AUX_VECTOR:#x}; unmasked: {aux1}, PBA bit {bit_after}"),
    );

    // What one emulated table access costs the guest (a nested page fault, the instruction
    // fetched through its page tables, decoded and emulated).
    let t0 = crate::abi::rdtsc();
    let mut sum = 0u32;
    for _ in 0..64 {
        sum = sum.wrapping_add(m.read(1, 2));
    }
    println!(
        "msi-x-nvme: emulated table read: {} cycles each (64 reads, sum {sum:#x})",
        (crate::abi::rdtsc() - t0) / 64
    );

    if dest == 1 {
        // One more completion wakes the halted worker so it sees DONE.
        irq::WORKER_DONE.store(true, SeqCst);
        submit(&mut s, false, 0)?;
        poll(&mut s, 1)?;
        let end = crate::abi::rdtsc() + 2000 * info.tsc_khz.get();
        while !irq::WORKER_EXITED.load(SeqCst) && crate::abi::rdtsc() < end {
            core::hint::spin_loop();
        }
        let left = irq::WORKER_EXITED.load(SeqCst);
        println!(
            "msi-x-nvme: worker woken to stop by one more completion: {}",
            if left { "left" } else { "still halted" }
        );
        failures += u32::from(!left);
    }
    crate::idt::cli();
    m.control(false, false);
    s.teardown()?;
    if failures != 0 {
        return Err("MSI-X interrupts were not exactly one per completion");
    }
    Ok(())
}

/// Prints `what` with its verdict; 1 when it is wrong.
fn report(ok: bool, what: core::fmt::Arguments<'_>) -> u32 {
    println!("{what} {}", if ok { "ok" } else { "WRONG" });
    u32::from(!ok)
}

/// Interrupts of every vector the guest took.
fn all_taken() -> u64 {
    TAKEN.load(SeqCst) + STRAY.load(SeqCst) + AUX_TAKEN.load(SeqCst)
}

/// One I/O with entry 1 live, completion polled; returns the interrupts taken meanwhile
/// (within 100 ms).
fn io_and_count(info: &BootInfo, s: &mut Setup) -> Result<u64, &'static str> {
    let before = all_taken();
    submit(s, false, 0)?;
    poll(s, 1)?;
    crate::dma::delay_ms(info, 100);
    Ok(all_taken() - before)
}

/// The interrupt IDT loaded, MSI-X enabled with entry 0 masked on [`AUX_VECTOR`] and entry 1
/// on [`MSI_VECTOR`] to vCPU 0 (`masked1`: masked), and the controller set up with its
/// queues' interrupts on.
fn enable(info: &BootInfo, masked1: bool) -> Result<(Msix, Setup), &'static str> {
    let m = Msix::find()?;
    irq::load_idt();
    m.program(0, 0, AUX_VECTOR, true);
    m.program(1, 0, MSI_VECTOR, masked1);
    m.control(true, false);
    Ok((m, nvme::setup_with(info, true)?))
}

/// `msi-x-attacks`: through the emulated table the guest tries to make its NVMe controller
/// raise host vectors (compatibility-format messages with data 8 and 18: refused, the table
/// still reads back what was written; 0x40: the guest's own vector 0x40), a remappable-format
/// address (refused: never programmed raw), writes to the PBA (ignored), misaligned and
/// odd-sized table accesses (ignored: writes dropped, reads all ones), and masks and
/// unmasks an entry 64 times under 16 I/Os in flight. The device works afterwards.
pub fn attacks(info: &BootInfo) -> Outcome {
    let (m, mut s) = enable(info, true)?;
    crate::idt::sti();
    let mut failures = 0;

    // The PBA is read only.
    let before = m.pba_dword(0);
    // SAFETY: the PBA's first dword, identity-mapped uncached (`Msix::find`).
    unsafe { core::ptr::write_volatile(m.pba as *mut u32, u32::MAX) };
    let after = m.pba_dword(0);
    failures += report(
        before == after,
        format_args!(
            "msi-x-attacks: PBA written with all ones: reads {before:#x} before, {after:#x} after",
        ),
    );

    for vector in [8u8, 18, 0x40] {
        m.program(1, 0, vector, false);
        let back = m.read(1, 2);
        let got = io_and_count(info, &mut s)?;
        let want = u64::from(vector >= 32);
        failures += report(
            got == want && back == u32::from(vector),
            format_args!(
                "msi-x-attacks: entry 1 data {vector:#x}: table reads back {back:#x}, {got} interrupt(s) in the guest (want {want})"
            ),
        );
        m.mask(1, true);
    }
    // A remappable-format address (bit 4): naming an IRTE is the hypervisor's privilege.
    m.write(1, 0, 0xfee0_0010);
    m.write(1, 2, u32::from(MSI_VECTOR));
    m.mask(1, false);
    let got = io_and_count(info, &mut s)?;
    failures += report(
        got == 0,
        format_args!(
            "msi-x-attacks: entry 1 with a remappable-format address: {got} interrupt(s) in the guest (want 0)",
        ),
    );
    m.mask(1, true);

    // Odd-sized and misaligned accesses to entry 1 (masked, MSI_VECTOR to vCPU 0).
    m.program(1, 0, MSI_VECTOR, true);
    let e1 = m.at(1, 0);
    let (byte, misaligned, qword): (u64, u64, u64);
    // SAFETY: accesses to the emulated table page of this guest's own device (the hypervisor
    // ignores the ones the PCI specification leaves undefined); no memory of the guest is
    // touched.
    unsafe {
        core::arch::asm!(
            "mov word ptr [{e} + 8], 0x1234",
            "mov dword ptr [{e} + 2], 0xdeadbeef",
            "movzx {b}, byte ptr [{e} + 8]",
            "mov {m}, qword ptr [{e} + 4]",
            "mov {q}, qword ptr [{e}]",
            e = in(reg) e1,
            b = out(reg) byte,
            m = out(reg) misaligned,
            q = out(reg) qword,
            options(nostack),
        );
    }
    let entry = [m.read(1, 0), m.read(1, 1), m.read(1, 2), m.read(1, 3)];
    let ok = byte == 0xff
        && misaligned == u64::MAX
        && qword == u64::from(address(0))
        && entry == [address(0), 0, u32::from(MSI_VECTOR), 1];
    failures += report(
        ok,
        format_args!(
            "msi-x-attacks: 2-byte write, misaligned dword write: entry reads {entry:x?}; byte read {byte:#x}, misaligned qword read {misaligned:#x}, aligned qword read {qword:#x}",
        ),
    );
    // An aligned qword write (data and vector control at once): emulated.
    // SAFETY: as above, an aligned qword of entry 1.
    unsafe { core::ptr::write_volatile((e1 + 8) as *mut u64, u64::from(MSI_VECTOR)) };
    let live = m.read(1, 3) == 0;

    // Mask and unmask 64 times under 16 I/Os in flight.
    let before = TAKEN.load(SeqCst);
    let q = s.queues[0].as_mut().ok_or("no queue")?;
    let bs = u64::from(q.namespace().block_size);
    let reqs: [Request; 16] = core::array::from_fn(|k| Request {
        write: false,
        lba: k as u64 * 4096 / bs,
        gpa: data(0) + k as u64 * 4096,
        len: 4096,
        tag: k as u64,
    });
    q.submit(&mut s.p, &mut s.m, &reqs)
        .map_err(|_| "NVMe submit failed")?;
    for k in 0..64 {
        m.mask(1, k % 2 == 0);
    }
    m.mask(1, false);
    poll(&mut s, 16)?;
    crate::dma::delay_ms(info, 100);
    let under = TAKEN.load(SeqCst) - before;
    // The device still interrupts: one more I/O waited for by its interrupt.
    let before = TAKEN_ON[0].load(SeqCst);
    submit(&mut s, false, 0)?;
    let arrived = irq::wait_taken(info, 0, before + 1, 2000, true);
    poll(&mut s, 1)?;
    let ok = live && arrived && under >= 1;
    failures += report(
        ok,
        format_args!(
            "msi-x-attacks: qword write made entry 1 live: {live}; 64 mask/unmask writes under 16 I/Os: all completed, {under} interrupt(s); the next I/O's interrupt {}",
            if arrived { "arrived" } else { "did NOT arrive" },
        ),
    );
    crate::idt::cli();
    m.control(false, false);
    s.teardown()?;
    if failures == 0 {
        Ok(())
    } else {
        Err("an MSI-X attack had an effect")
    }
}

/// `msi-x-storm=N`: with entry 1 live and interrupts off, N I/Os one at a time, each
/// completion polled: every completion's MSI-X merges into the vector still pending (the
/// guest takes none), so the host masks the entry past its storm threshold. With interrupts
/// on the guest then takes exactly the one pending interrupt; the entry reprogrammed (masked
/// and unmasked), the next I/O's interrupt arrives again.
pub fn storm(info: &BootInfo, n: u64) -> Outcome {
    let (m, mut s) = enable(info, false)?;
    crate::idt::cli();
    let before = TAKEN_ON[0].load(SeqCst);
    for _ in 0..n {
        submit(&mut s, false, 0)?;
        poll(&mut s, 1)?;
    }
    crate::idt::sti();
    crate::dma::delay_ms(info, 100);
    let taken = TAKEN_ON[0].load(SeqCst) - before;
    println!(
        "msi-x-storm: {n} I/O(s) polled with interrupts off: all completed, {taken} interrupt(s) taken after sti (want 1)"
    );
    m.mask(1, true);
    m.program(1, 0, MSI_VECTOR, false);
    let before = TAKEN_ON[0].load(SeqCst);
    submit(&mut s, false, 0)?;
    let arrived = irq::wait_taken(info, 0, before + 1, 2000, true);
    poll(&mut s, 1)?;
    println!(
        "msi-x-storm: entry 1 reprogrammed: the next I/O's interrupt {}",
        if arrived { "arrived" } else { "did NOT arrive" }
    );
    crate::idt::cli();
    m.control(false, false);
    s.teardown()?;
    if taken != 1 || !arrived {
        return Err("not one interrupt after the storm, or none after reprogramming");
    }
    Ok(())
}

/// `msi-x-unemulated`: an instruction the hypervisor does not emulate (`add` to memory) on the
/// table page: the hypervisor stops this guest with a clear line (this never returns).
pub fn unemulated() -> Outcome {
    let m = Msix::find()?;
    println!("msi-x-unemulated: add dword ptr [table], 1");
    // SAFETY: the emulated table page of this guest's own device; the hypervisor refuses the
    // instruction and stops the guest.
    unsafe {
        core::arch::asm!("add dword ptr [{}], 1", in(reg) m.table, options(nostack));
    }
    Err("the hypervisor emulated an ADD to the MSI-X table")
}
