//! The ALU results and flags of `moat_x86arch::insn::alu` against this (x86-64) host's own
//! instructions: an integration test because the library forbids `unsafe` (the inline
//! assembly lives here).
#![cfg(target_arch = "x86_64")]

use moat_x86arch::insn::{alu, mask, AluOp, ARITH_FLAGS};
use proptest::prelude::*;

/// RFLAGS.AF (undefined after the logic operations).
const AF: u64 = 1 << 4;

/// What this host's own instruction gives for `a op b` with carry in `carry`: the result and
/// the arithmetic flags (AF masked for the logic operations, where it is undefined).
fn host_alu(op: AluOp, a: u64, b: u64, carry: bool, size: u8) -> (u64, u64) {
    let (mut r, f): (u64, u64);
    macro_rules! run {
        ($op:literal, $reg:ident) => {
            // SAFETY: register-only arithmetic and a PUSHF/POP on this thread's stack.
            unsafe {
                core::arch::asm!(
                    "bt {c}, 0",
                    concat!($op, " {a:", stringify!($reg), "}, {b:", stringify!($reg), "}"),
                    "pushfq",
                    "pop {f}",
                    c = in(reg) u64::from(carry),
                    a = inout(reg) a => r,
                    b = in(reg) b,
                    f = out(reg) f,
                )
            }
        };
    }
    macro_rules! sized {
        ($op:literal) => {
            match size {
                1 => run!($op, l),
                2 => run!($op, x),
                4 => run!($op, e),
                _ => run!($op, r),
            }
        };
    }
    match op {
        AluOp::Add => sized!("add"),
        AluOp::Or => sized!("or"),
        AluOp::Adc => sized!("adc"),
        AluOp::Sbb => sized!("sbb"),
        AluOp::And => sized!("and"),
        AluOp::Sub => sized!("sub"),
        AluOp::Xor => sized!("xor"),
        AluOp::Cmp => sized!("cmp"),
    }
    if !op.writes() {
        r = a;
    }
    let logic = matches!(op, AluOp::Or | AluOp::And | AluOp::Xor);
    (
        r & mask(size),
        f & ARITH_FLAGS & if logic { !AF } else { u64::MAX },
    )
}

proptest! {
    #[test]
    fn alu_results_and_flags_match_the_cpu(
        op in prop::sample::select(AluOp::ALL.to_vec()),
        a in any::<u64>(),
        b in any::<u64>(),
        carry in any::<bool>(),
        size in prop::sample::select(vec![1u8, 2, 4, 8]),
        equal in any::<bool>(),
    ) {
        let b = if equal { a } else { b };
        let (r, f) = alu(op, a, b, carry, size);
        let (hr, hf) = host_alu(op, a, b, carry, size);
        prop_assert_eq!(if op.writes() { r } else { a & mask(size) }, hr);
        prop_assert_eq!(f, hf);
    }
}
