//! `dma-register-race`: two vCPUs race registrations of the same guest page against each
//! other and against a MAP of it. The ABI allows at most one of each pair to succeed (a page
//! is one vCPU's batch area, or the fault ring, or mapped for the device; never two of these).
//!
//! Each round both vCPUs wait for a common start flag, then each makes its call at once:
//! 1. vCPU 0 BATCH_REGISTER(P) against vCPU 1 BATCH_REGISTER(P) (its own area slot);
//! 2. vCPU 0 BATCH_REGISTER(P) against vCPU 1 FAULT_RING_REGISTER(P);
//! 3. vCPU 0 BATCH_REGISTER(P) against vCPU 1 DMA_MAP(P).
//!
//! Both succeeding is a violation; afterwards each undoes what it got. The result line gives
//! the rounds, how often both calls of a pair succeeded, and how often the calls overlapped in
//! time (both in the hypervisor at once, as the guest can tell from its TSC), so a run that
//! never raced is visible as such.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};

use moat_abi::{Call, Status};

use crate::dma::raw;

use crate::{println, Outcome};

const PAGE: u64 = moat_abi::dma::PAGE_SIZE;
/// Rounds per pair.
const ROUNDS: u32 = 400;

#[repr(C, align(4096))]
struct Target([u8; PAGE as usize]);
/// The page both vCPUs fight over.
static mut TARGET: Target = Target([0; PAGE as usize]);

/// Round number vCPU 0 has released (vCPU 1 starts when it sees it).
static GO: AtomicU32 = AtomicU32::new(0);
/// Round whose results vCPU 0 has judged (vCPU 1 may undo its call).
static UNDO: AtomicU32 = AtomicU32::new(0);
/// Round number vCPU 1 has finished (undone).
static DONE: AtomicU32 = AtomicU32::new(0);
/// vCPU 1's result of the current round: 0 none yet, 1 OK, 2 an error.
static ONE_STATUS: AtomicU64 = AtomicU64::new(0);
/// TSC at which vCPU 1 entered and left its call.
static ONE_T: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
/// Which pair (1..=3) is being raced; 0: stop.
static PAIR: AtomicU32 = AtomicU32::new(0);

fn target() -> u64 {
    core::ptr::addr_of!(TARGET) as u64
}

/// A start delay in TSC cycles for `vcpu` in `round`: the rounds sweep the two calls' relative
/// phase over about 40,000 cycles (a DMA hypercall's length under emulation), so some rounds
/// put both vCPUs inside the hypervisor's check-then-publish window at once.
fn phase(round: u32, vcpu: u32) -> u64 {
    let x = round.wrapping_mul(2_654_435_761) >> 8;
    if x & 1 == vcpu {
        u64::from(x % 40_000)
    } else {
        0
    }
}

fn spin_cycles(c: u64) {
    let t = crate::abi::rdtsc();
    while crate::abi::rdtsc() - t < c {
        core::hint::spin_loop();
    }
}

/// vCPU 1's side.
pub fn worker() {
    let mut round = 0;
    loop {
        while GO.load(SeqCst) == round {
            core::hint::spin_loop();
        }
        round = GO.load(SeqCst);
        let pair = PAIR.load(SeqCst);
        if pair == 0 {
            return;
        }
        spin_cycles(phase(round, 1));
        let t0 = crate::abi::rdtsc();
        let r = match pair {
            1 => raw(Call::DmaBatchRegister, [target(), 1, 0, 0, 0, 0]),
            2 => raw(Call::DmaFaultRingRegister, [target(), 1, 0, 0, 0, 0]),
            _ => raw(
                Call::DmaMap,
                [
                    target(),
                    PAGE,
                    moat_abi::dma::DmaFlags::READ_WRITE.bits() as u64,
                    0,
                    0,
                    0,
                ],
            ),
        };
        let t1 = crate::abi::rdtsc();
        ONE_T[0].store(t0, SeqCst);
        ONE_T[1].store(t1, SeqCst);
        ONE_STATUS.store(if r.0 == Some(Status::Ok) { 1 } else { 2 }, SeqCst);
        // Hold what it got until vCPU 0 has judged the round, then undo it.
        while UNDO.load(SeqCst) != round {
            core::hint::spin_loop();
        }
        if r.0 == Some(Status::Ok) {
            let _ = match pair {
                1 => raw(Call::DmaBatchRegister, [0, 0, 0, 0, 0, 0]),
                2 => raw(Call::DmaFaultRingRegister, [0, 0, 0, 0, 0, 0]),
                _ => raw(Call::DmaUnmap, [r.1[0], PAGE, 0, 0, 0, 0]),
            };
        }
        DONE.store(round, SeqCst);
    }
}

/// vCPU 0's side: runs the rounds and judges them.
pub fn run(boot: &crate::abi::BootInfo) -> Outcome {
    if boot.vcpus.get() < 2 {
        return Err("needs 2 vCPUs");
    }
    let mut round = 0u32;
    let mut total_both = 0;
    for pair in 1..=3u32 {
        let (mut both, mut overlapped) = (0u32, 0u32);
        for _ in 0..ROUNDS {
            round += 1;
            PAIR.store(pair, SeqCst);
            ONE_STATUS.store(0, SeqCst);
            GO.store(round, SeqCst);
            spin_cycles(phase(round, 0));
            let t0 = crate::abi::rdtsc();
            let r = raw(Call::DmaBatchRegister, [target(), 1, 0, 0, 0, 0]);
            let t1 = crate::abi::rdtsc();
            let t_wait = crate::abi::rdtsc();
            while ONE_STATUS.load(SeqCst) == 0 {
                if crate::abi::rdtsc() - t_wait > 10_000 * boot.tsc_khz.get() {
                    return Err("vCPU 1 stopped answering");
                }
                core::hint::spin_loop();
            }
            // Both calls have returned and neither has been undone: both hold now.
            let mine = r.0 == Some(Status::Ok);
            let theirs = ONE_STATUS.load(SeqCst) == 1;
            if mine && theirs {
                both += 1;
            }
            if mine {
                let _ = raw(Call::DmaBatchRegister, [0, 0, 0, 0, 0, 0]);
            }
            UNDO.store(round, SeqCst);
            while DONE.load(SeqCst) != round {
                if crate::abi::rdtsc() - t_wait > 10_000 * boot.tsc_khz.get() {
                    return Err("vCPU 1 stopped answering");
                }
                core::hint::spin_loop();
            }
            let (o0, o1) = (ONE_T[0].load(SeqCst), ONE_T[1].load(SeqCst));
            if o0 < t1 && t0 < o1 {
                overlapped += 1;
            }
        }
        let what = match pair {
            1 => "BATCH_REGISTER vs BATCH_REGISTER",
            2 => "BATCH_REGISTER vs FAULT_RING_REGISTER",
            _ => "BATCH_REGISTER vs MAP",
        };
        println!(
            "dma-register-race: {what}: {ROUNDS} rounds, {overlapped} with the calls overlapping, both succeeded {both} time(s)"
        );
        if overlapped == 0 {
            return Err("the calls never overlapped: the race was not tested");
        }
        total_both += both;
    }
    PAIR.store(0, SeqCst);
    GO.store(round + 1, SeqCst);
    if total_both != 0 {
        return Err("a page was registered twice, or registered and mapped at once");
    }
    Ok(())
}
