//! Decoding the instruction behind an emulated MMIO access (a nested page fault or EPT
//! violation on a page the hypervisor keeps unmapped, such as an assigned device's MSI-X
//! table): the `MOV` forms drivers use on device registers, in 64-bit mode.
//!
//! The faulting guest-physical address comes from the exit, so the decoder never computes an
//! effective address: it only needs the instruction's length (prefixes, ModRM, SIB,
//! displacement, immediate), the direction, the access width and the register or immediate.
//! Supported: `88`/`89` (store a register), `8A`/`8B` (load a register), `C6 /0`/`C7 /0`
//! (store an immediate), `0F B6`/`0F B7` (`MOVZX` loads), and what a compiler folds a
//! volatile load into: the register-destination ALU forms (`02`/`03` `ADD`, `0A`/`0B` `OR`,
//! `12`/`13` `ADC`, `1A`/`1B` `SBB`, `22`/`23` `AND`, `2A`/`2B` `SUB`, `32`/`33` `XOR`:
//! [`alu`]) and the compares (`38`/`39`/`3A`/`3B` `CMP` with a register, `80`/`81`/`83 /7`
//! `CMP` with an immediate, `84`/`85` `TEST` with a register, `F6`/`F7 /0` `TEST` with an
//! immediate: a load that only sets the arithmetic flags, [`compare_flags`]), with the
//! operand-size (`66`), address-size (`67`) and segment prefixes and a REX prefix. Anything
//! else (another opcode, a read-modify-write such as `ADD` to memory, a register operand,
//! `LOCK`/`REP`, more than 15 bytes, too few bytes) is a [`DecodeError`]: the caller refuses
//! the access.

/// Longest x86 instruction.
pub const MAX_LEN: usize = 15;

/// A general-purpose register operand: `index` 0..16 in encoding order (RAX, RCX, RDX, RBX,
/// RSP, RBP, RSI, RDI, R8..R15); `high_byte` for AH, CH, DH, BH (byte operands 4..8 without
/// a REX prefix), which are bits 15:8 of RAX, RCX, RDX, RBX (then `index` is 0..4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gpr {
    /// Register number (0..16).
    pub index: u8,
    /// Bits 15:8 of register `index` (AH, CH, DH, BH).
    pub high_byte: bool,
}

impl Gpr {
    fn byte(reg: u8, rex: bool) -> Gpr {
        if !rex && (4..8).contains(&reg) {
            Gpr {
                index: reg - 4,
                high_byte: true,
            }
        } else {
            Gpr {
                index: reg,
                high_byte: false,
            }
        }
    }

    fn full(reg: u8) -> Gpr {
        Gpr {
            index: reg,
            high_byte: false,
        }
    }

    /// The `size`-byte value this operand holds when the register is `reg`.
    pub const fn read(&self, reg: u64, size: u8) -> u64 {
        if self.high_byte {
            (reg >> 8) & 0xff
        } else {
            reg & mask(size)
        }
    }

    /// The register's new value after a load of `value` into this `size`-byte operand, the
    /// register being `old`: a 4-byte destination is zero-extended to 64 bits, 1- and
    /// 2-byte destinations keep the other bits (x86 semantics).
    pub const fn merge(&self, old: u64, value: u64, size: u8) -> u64 {
        if self.high_byte {
            return old & !0xff00 | (value & 0xff) << 8;
        }
        match size {
            4 => value & 0xffff_ffff,
            8 => value,
            _ => old & !mask(size) | value & mask(size),
        }
    }
}

/// The low `size` bytes.
pub const fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * size as u32)) - 1
    }
}

/// What is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A register (its low `size` bytes, or AH..BH).
    Reg(Gpr),
    /// An immediate, already sign-extended to the access width.
    Imm(u64),
}

/// One decoded MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioOp {
    /// A store of `size` bytes of `src` to memory.
    Store {
        /// Bytes written (1, 2, 4, 8).
        size: u8,
        /// What is written.
        src: Source,
    },
    /// A load of `size` bytes from memory into `dst`, as a `dst_size`-byte operand
    /// (zero-extended when larger: `MOVZX`).
    Load {
        /// Bytes read (1, 2, 4, 8).
        size: u8,
        /// The destination register.
        dst: Gpr,
        /// Bytes of the destination operand (>= `size`).
        dst_size: u8,
    },
    /// A load of `size` bytes into an ALU operation on a register: `dst = dst op mem`
    /// (`02`/`03`, `0A`/`0B`, ... `32`/`33`), with the flags set.
    Alu {
        /// Bytes read (1, 2, 4, 8), also the operand size.
        size: u8,
        /// The operation (never `Cmp`: that is [`MmioOp::Compare`]).
        op: AluOp,
        /// The destination register (also the left operand).
        dst: Gpr,
    },
    /// A load of `size` bytes that only sets the arithmetic flags: `CMP mem, src` (or
    /// `CMP src, mem` when `!mem_left`), or `TEST mem, src`.
    Compare {
        /// Bytes read and compared (1, 2, 4, 8).
        size: u8,
        /// The other operand.
        src: Source,
        /// Memory is the left operand (`mem - src`); else `src - mem`.
        mem_left: bool,
        /// `TEST` (`mem & src`) rather than `CMP`.
        test: bool,
    },
}

/// RFLAGS bits a compare sets: CF, PF, AF, ZF, SF, OF.
pub const ARITH_FLAGS: u64 = 0x8d5;
const CF: u64 = Flag::Carry as u64;
const PF: u64 = Flag::Parity as u64;
const AF: u64 = Flag::Adjust as u64;
const ZF: u64 = Flag::Zero as u64;
const SF: u64 = Flag::Sign as u64;
const OF: u64 = Flag::Overflow as u64;

/// The arithmetic flags, by their RFLAGS bit.
#[repr(u64)]
enum Flag {
    /// Carry (borrow of a subtraction).
    Carry = 1,
    /// Even parity of the result's low byte.
    Parity = 1 << 2,
    /// Carry out of bit 3.
    Adjust = 1 << 4,
    /// Zero result.
    Zero = 1 << 6,
    /// Sign bit of the result.
    Sign = 1 << 7,
    /// Signed overflow.
    Overflow = 1 << 11,
}

/// The eight classic ALU operations, in their encoding order (bits 5:3 of `00`..`3F`, or the
/// ModRM reg field of `80`/`81`/`83`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AluOp {
    /// `a + b`.
    Add,
    /// `a | b`.
    Or,
    /// `a + b + CF`.
    Adc,
    /// `a - b - CF`.
    Sbb,
    /// `a & b` (also `TEST`).
    And,
    /// `a - b`.
    Sub,
    /// `a ^ b`.
    Xor,
    /// `a - b`, flags only.
    Cmp,
}

impl AluOp {
    /// Every operation, in encoding order.
    pub const ALL: [AluOp; 8] = [
        AluOp::Add,
        AluOp::Or,
        AluOp::Adc,
        AluOp::Sbb,
        AluOp::And,
        AluOp::Sub,
        AluOp::Xor,
        AluOp::Cmp,
    ];

    /// Whether the result is written back (all but `CMP`).
    pub const fn writes(self) -> bool {
        !matches!(self, AluOp::Cmp)
    }
}

/// `a op b` on `size`-byte operands with carry in `carry` (ADC, SBB): the result (cut to
/// `size` bytes) and its arithmetic flags (within [`ARITH_FLAGS`]; the logic operations clear
/// CF and OF, and AF, which they leave undefined).
pub const fn alu(op: AluOp, a: u64, b: u64, carry: bool, size: u8) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let sign = 1u64 << (8 * size as u32 - 1);
    let c = carry as u64;
    // Wide arithmetic: the carry or borrow out of the top bit is bit 8 * size (or the u128's).
    let (r, cf, of, arith) = match op {
        AluOp::Add | AluOp::Adc => {
            let cin = if matches!(op, AluOp::Adc) { c } else { 0 };
            let wide = a as u128 + b as u128 + cin as u128;
            let r = wide as u64 & m;
            (r, wide > m as u128, !(a ^ b) & (a ^ r) & sign != 0, true)
        }
        AluOp::Sub | AluOp::Sbb | AluOp::Cmp => {
            let bin = if matches!(op, AluOp::Sbb) { c } else { 0 };
            let r = a.wrapping_sub(b).wrapping_sub(bin) & m;
            let borrow = (a as u128) < b as u128 + bin as u128;
            (r, borrow, (a ^ b) & (a ^ r) & sign != 0, true)
        }
        AluOp::Or => (a | b, false, false, false),
        AluOp::And => (a & b, false, false, false),
        AluOp::Xor => (a ^ b, false, false, false),
    };
    let mut f = 0;
    if cf {
        f |= CF;
    }
    if of {
        f |= OF;
    }
    if arith && (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    if r == 0 {
        f |= ZF;
    }
    if r & sign != 0 {
        f |= SF;
    }
    if (r as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    (r, f)
}

/// The arithmetic flags of `CMP a, b` (`a - b`), or of `TEST a, b` (`a & b`), on `size`-byte
/// operands (see [`alu`]).
pub const fn compare_flags(a: u64, b: u64, size: u8, test: bool) -> u64 {
    let op = if test { AluOp::And } else { AluOp::Cmp };
    alu(op, a, b, false, size).1
}

/// A decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes of the instruction (RIP advances by this much).
    pub len: u8,
    /// The access.
    pub op: MmioOp,
}

/// Why an instruction was not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does (a fetch stopped at an unmapped page).
    Truncated,
    /// Longer than 15 bytes (prefixes only).
    TooLong,
    /// An opcode this decoder does not emulate (the first opcode byte; `0F xx` as `0x0Fxx`).
    Unsupported(u16),
    /// A register operand where memory was expected (it could not have faulted on MMIO).
    NotMemory,
    /// A `LOCK`, `REP`/`REPNE` prefix, or a `C6`/`C7` with a ModRM reg field other than 0.
    Invalid,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Truncated => f.write_str("instruction bytes end early"),
            Self::TooLong => f.write_str("longer than 15 bytes"),
            Self::Unsupported(op) => write!(f, "opcode {op:#x} not emulated"),
            Self::NotMemory => f.write_str("register operand (no memory access)"),
            Self::Invalid => f.write_str("LOCK/REP prefix or invalid ModRM.reg"),
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.at >= MAX_LEN {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.at).ok_or(DecodeError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        for _ in 0..n {
            self.next()?;
        }
        Ok(())
    }

    fn imm(&mut self, n: usize) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..n {
            v |= u64::from(self.next()?) << (8 * i);
        }
        Ok(v)
    }
}

/// Decodes the 64-bit-mode instruction at the start of `bytes` (at most [`MAX_LEN`] are
/// looked at).
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let mut c = Cursor { bytes, at: 0 };
    let mut opsize16 = false;
    let mut rex = 0u8;
    let mut b = c.next()?;
    loop {
        match b {
            0x66 => opsize16 = true,
            0x67 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            0xf0 | 0xf2 | 0xf3 => return Err(DecodeError::Invalid),
            // A REX prefix counts only right before the opcode.
            0x40..=0x4f => {
                rex = b;
                b = c.next()?;
                if (0x40..=0x4f).contains(&b) || is_legacy_prefix(b) {
                    rex = 0;
                    continue;
                }
                break;
            }
            _ => break,
        }
        rex = 0;
        b = c.next()?;
    }
    let has_rex = rex != 0;
    let w = rex & 8 != 0;
    let r = (rex >> 2) & 1;
    let size = if w {
        8
    } else if opsize16 {
        2
    } else {
        4
    };
    let opcode: u16 = if b == 0x0f {
        0x0f00 | u16::from(c.next()?)
    } else {
        u16::from(b)
    };
    if !matches!(
        opcode,
        0x88 | 0x89
            | 0x8a
            | 0x8b
            | 0xc6
            | 0xc7
            | 0x0fb6
            | 0x0fb7
            | 0x02
            | 0x03
            | 0x0a
            | 0x0b
            | 0x12
            | 0x13
            | 0x1a
            | 0x1b
            | 0x22
            | 0x23
            | 0x2a
            | 0x2b
            | 0x32
            | 0x33
            | 0x38
            | 0x39
            | 0x3a
            | 0x3b
            | 0x80
            | 0x81
            | 0x83
            | 0x84
            | 0x85
            | 0xf6
            | 0xf7
    ) {
        return Err(DecodeError::Unsupported(opcode));
    }
    let modrm = c.next()?;
    let (md, reg, rm) = (modrm >> 6, ((modrm >> 3) & 7) | r << 3, modrm & 7);
    if md == 3 {
        return Err(DecodeError::NotMemory);
    }
    let mut disp = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = c.next()?;
        if md == 0 && sib & 7 == 5 {
            disp = 4;
        }
    } else if md == 0 && rm == 5 {
        // RIP-relative (64-bit mode).
        disp = 4;
    }
    c.skip(disp)?;
    // Group opcodes: only CMP (/7) and TEST (/0) read without writing.
    let group = (reg & 7) as u16;
    match opcode {
        0x80 | 0x81 | 0x83 if group != 7 => return Err(DecodeError::Unsupported(opcode)),
        0xf6 | 0xf7 if group != 0 => return Err(DecodeError::Unsupported(opcode)),
        _ => {}
    }
    // An immediate of `n` bytes sign-extended to `size` bytes.
    let simm = |c: &mut Cursor<'_>, n: usize, size: u8| -> Result<u64, DecodeError> {
        let v = c.imm(n)?;
        let shift = 64 - 8 * n as u32;
        Ok(((v << shift) as i64 >> shift) as u64 & mask(size))
    };
    // The full-size immediate of 81/F7: 2 bytes with 66, else 4 (sign-extended to 8).
    let iz = if size == 2 { 2 } else { 4 };
    let op = match opcode {
        // op r8, r/m8 and op r, r/m: the register is the destination.
        0x02..=0x33 => {
            let alu = AluOp::ALL[usize::from(opcode >> 3)];
            if opcode & 1 == 0 {
                MmioOp::Alu {
                    size: 1,
                    op: alu,
                    dst: Gpr::byte(reg, has_rex),
                }
            } else {
                MmioOp::Alu {
                    size,
                    op: alu,
                    dst: Gpr::full(reg),
                }
            }
        }
        0x38 | 0x3a | 0x84 => MmioOp::Compare {
            size: 1,
            src: Source::Reg(Gpr::byte(reg, has_rex)),
            mem_left: opcode != 0x3a,
            test: opcode == 0x84,
        },
        0x39 | 0x3b | 0x85 => MmioOp::Compare {
            size,
            src: Source::Reg(Gpr::full(reg)),
            mem_left: opcode != 0x3b,
            test: opcode == 0x85,
        },
        0x80 | 0xf6 => MmioOp::Compare {
            size: 1,
            src: Source::Imm(c.imm(1)?),
            mem_left: true,
            test: opcode == 0xf6,
        },
        0x83 => MmioOp::Compare {
            size,
            src: Source::Imm(simm(&mut c, 1, size)?),
            mem_left: true,
            test: false,
        },
        0x81 | 0xf7 => MmioOp::Compare {
            size,
            src: Source::Imm(simm(&mut c, iz, size)?),
            mem_left: true,
            test: opcode == 0xf7,
        },
        0x88 => MmioOp::Store {
            size: 1,
            src: Source::Reg(Gpr::byte(reg, has_rex)),
        },
        0x89 => MmioOp::Store {
            size,
            src: Source::Reg(Gpr::full(reg)),
        },
        0x8a => MmioOp::Load {
            size: 1,
            dst: Gpr::byte(reg, has_rex),
            dst_size: 1,
        },
        0x8b => MmioOp::Load {
            size,
            dst: Gpr::full(reg),
            dst_size: size,
        },
        0x0fb6 | 0x0fb7 => MmioOp::Load {
            size: if opcode == 0x0fb6 { 1 } else { 2 },
            dst: Gpr::full(reg),
            dst_size: size,
        },
        0xc6 | 0xc7 => {
            if reg & 7 != 0 {
                return Err(DecodeError::Invalid);
            }
            if opcode == 0xc6 {
                MmioOp::Store {
                    size: 1,
                    src: Source::Imm(c.imm(1)?),
                }
            } else if size == 2 {
                MmioOp::Store {
                    size,
                    src: Source::Imm(c.imm(2)?),
                }
            } else {
                let v = c.imm(4)?;
                // imm32 sign-extended to 64 bits under REX.W.
                let v = if size == 8 {
                    v as u32 as i32 as i64 as u64
                } else {
                    v
                };
                MmioOp::Store {
                    size,
                    src: Source::Imm(v),
                }
            }
        }
        _ => return Err(DecodeError::Unsupported(opcode)),
    };
    Ok(Decoded {
        len: c.at as u8,
        op,
    })
}

const fn is_legacy_prefix(b: u8) -> bool {
    matches!(
        b,
        0x66 | 0x67 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0xf0 | 0xf2 | 0xf3
    )
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    /// One instruction for the encoder: what the decoder must give back.
    #[derive(Debug, Clone)]
    struct Insn {
        prefixes: Vec<u8>,
        rex: Option<u8>,
        opcode: u16,
        modrm_mod: u8,
        reg: u8,
        rm: u8,
        sib: u8,
        imm: u32,
    }

    fn encode(i: &Insn) -> Vec<u8> {
        let mut b = i.prefixes.clone();
        if let Some(r) = i.rex {
            b.push(0x40 | r);
        }
        if i.opcode > 0xff {
            b.push(0x0f);
        }
        b.push(i.opcode as u8);
        let reg = match i.opcode {
            0xc6 | 0xc7 | 0xf6 | 0xf7 => 0,
            0x80 | 0x81 | 0x83 => 7,
            _ => i.reg & 7,
        };
        b.push(i.modrm_mod << 6 | reg << 3 | i.rm);
        let mut disp = match i.modrm_mod {
            1 => 1,
            2 => 4,
            _ => 0,
        };
        if i.rm == 4 {
            b.push(i.sib);
            if i.modrm_mod == 0 && i.sib & 7 == 5 {
                disp = 4;
            }
        } else if i.modrm_mod == 0 && i.rm == 5 {
            disp = 4;
        }
        b.extend(core::iter::repeat_n(0xa5, disp));
        let w = i.rex.is_some_and(|r| r & 8 != 0);
        let o16 = i.prefixes.contains(&0x66);
        match i.opcode {
            0xc6 | 0x80 | 0x83 | 0xf6 => b.push(i.imm as u8),
            0xc7 | 0x81 | 0xf7 if o16 && !w => b.extend_from_slice(&(i.imm as u16).to_le_bytes()),
            0xc7 | 0x81 | 0xf7 => b.extend_from_slice(&i.imm.to_le_bytes()),
            _ => {}
        }
        b
    }

    /// `v`'s low `n` bytes sign-extended, cut to `size` bytes.
    fn sext(v: u32, n: u32, size: u8) -> u64 {
        let shift = 64 - 8 * n;
        ((u64::from(v) << shift) as i64 >> shift) as u64 & mask(size)
    }

    fn expected(i: &Insn) -> MmioOp {
        let rex = i.rex.unwrap_or(0);
        let w = rex & 8 != 0;
        let size = if w {
            8
        } else if i.prefixes.contains(&0x66) {
            2
        } else {
            4
        };
        let reg = (i.reg & 7) | ((rex >> 2) & 1) << 3;
        // Byte registers 4..8 are AH, CH, DH, BH without a REX prefix.
        let high = i.rex.is_none() && (4..8).contains(&reg);
        let byte = Gpr {
            index: reg - 4 * u8::from(high),
            high_byte: high,
        };
        let full = Gpr {
            index: reg,
            high_byte: false,
        };
        let iz = if size == 2 { 2 } else { 4 };
        let cmp = |size: u8, src: Source, mem_left: bool, test: bool| MmioOp::Compare {
            size,
            src,
            mem_left,
            test,
        };
        let alu = AluOp::ALL[usize::from(i.opcode >> 3) & 7];
        match i.opcode {
            0x02 | 0x0a | 0x12 | 0x1a | 0x22 | 0x2a | 0x32 => MmioOp::Alu {
                size: 1,
                op: alu,
                dst: byte,
            },
            0x03 | 0x0b | 0x13 | 0x1b | 0x23 | 0x2b | 0x33 => MmioOp::Alu {
                size,
                op: alu,
                dst: full,
            },
            0x38 => cmp(1, Source::Reg(byte), true, false),
            0x3a => cmp(1, Source::Reg(byte), false, false),
            0x84 => cmp(1, Source::Reg(byte), true, true),
            0x39 => cmp(size, Source::Reg(full), true, false),
            0x3b => cmp(size, Source::Reg(full), false, false),
            0x85 => cmp(size, Source::Reg(full), true, true),
            0x80 => cmp(1, Source::Imm(u64::from(i.imm as u8)), true, false),
            0xf6 => cmp(1, Source::Imm(u64::from(i.imm as u8)), true, true),
            0x83 => cmp(size, Source::Imm(sext(i.imm, 1, size)), true, false),
            0x81 => cmp(size, Source::Imm(sext(i.imm, iz, size)), true, false),
            0xf7 => cmp(size, Source::Imm(sext(i.imm, iz, size)), true, true),
            0x88 => MmioOp::Store {
                size: 1,
                src: Source::Reg(byte),
            },
            0x89 => MmioOp::Store {
                size,
                src: Source::Reg(full),
            },
            0x8a => MmioOp::Load {
                size: 1,
                dst: byte,
                dst_size: 1,
            },
            0x8b => MmioOp::Load {
                size,
                dst: full,
                dst_size: size,
            },
            0x0fb6 => MmioOp::Load {
                size: 1,
                dst: full,
                dst_size: size,
            },
            0x0fb7 => MmioOp::Load {
                size: 2,
                dst: full,
                dst_size: size,
            },
            0xc6 => MmioOp::Store {
                size: 1,
                src: Source::Imm(u64::from(i.imm as u8)),
            },
            _ => MmioOp::Store {
                size,
                src: Source::Imm(match size {
                    2 => u64::from(i.imm as u16),
                    4 => u64::from(i.imm),
                    _ => i.imm as i32 as i64 as u64,
                }),
            },
        }
    }

    fn insn() -> impl Strategy<Value = Insn> {
        (
            proptest::collection::vec(
                prop::sample::select(vec![0x66u8, 0x67, 0x2e, 0x3e, 0x26, 0x64, 0x65, 0x36]),
                0..4,
            ),
            proptest::option::of(0u8..16),
            prop::sample::select(vec![
                0x88u16, 0x89, 0x8a, 0x8b, 0xc6, 0xc7, 0x0fb6, 0x0fb7, 0x38, 0x39, 0x3a, 0x3b,
                0x80, 0x81, 0x83, 0x84, 0x85, 0xf6, 0xf7, 0x02, 0x03, 0x0a, 0x0b, 0x12, 0x13, 0x1a,
                0x1b, 0x22, 0x23, 0x2a, 0x2b, 0x32, 0x33,
            ]),
            0u8..3,
            0u8..8,
            0u8..8,
            any::<u8>(),
            any::<u32>(),
        )
            .prop_map(
                |(prefixes, rex, opcode, modrm_mod, reg, rm, sib, imm)| Insn {
                    prefixes,
                    rex,
                    opcode,
                    modrm_mod,
                    reg,
                    rm,
                    sib,
                    imm,
                },
            )
    }

    proptest! {
        /// Every encoding of a supported form decodes to its length and operands, whatever
        /// bytes follow it.
        #[test]
        fn round_trip(i in insn(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = encode(&i);
            let len = bytes.len();
            bytes.extend(tail);
            let d = decode(&bytes).unwrap();
            prop_assert_eq!(usize::from(d.len), len);
            prop_assert_eq!(d.op, expected(&i));
        }

        /// Any prefix of an encoding is truncated, never a wrong decode or a panic.
        #[test]
        fn cut_short(i in insn(), cut in 0usize..15) {
            let bytes = encode(&i);
            let cut = cut % bytes.len();
            prop_assert_eq!(decode(&bytes[..cut]), Err(DecodeError::Truncated));
        }

        /// Arbitrary bytes never panic, and a decode never claims more than 15 bytes or more
        /// than it was given.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..20)) {
            if let Ok(d) = decode(&bytes) {
                prop_assert!(usize::from(d.len) <= MAX_LEN.min(bytes.len()));
            }
        }

        /// Loads: 4-byte destinations zero-extend, narrower ones keep the other bits.
        #[test]
        fn merge_semantics(old in any::<u64>(), v in any::<u64>(), index in 0u8..16) {
            let g = Gpr { index, high_byte: false };
            prop_assert_eq!(g.merge(old, v, 4), v & 0xffff_ffff);
            prop_assert_eq!(g.merge(old, v, 8), v);
            prop_assert_eq!(g.merge(old, v, 2), old & !0xffff | v & 0xffff);
            prop_assert_eq!(g.merge(old, v, 1), old & !0xff | v & 0xff);
            let h = Gpr { index: index & 3, high_byte: true };
            prop_assert_eq!(h.merge(old, v, 1), old & !0xff00 | (v & 0xff) << 8);
            prop_assert_eq!(h.read(old, 1), (old >> 8) & 0xff);
        }
    }

    /// Encodings the test guest's compiler emitted for its MSI-X table accesses (from
    /// `objdump -d` of the release build).
    #[test]
    fn fixed_encodings_from_the_guest() {
        let r = |index: u8| Gpr {
            index,
            high_byte: false,
        };
        let load = |size, dst, dst_size| MmioOp::Load {
            size,
            dst: r(dst),
            dst_size,
        };
        let store = |size, src| MmioOp::Store { size, src };
        let cases: &[(&[u8], MmioOp)] = &[
            // mov eax, dword [r13+0x10]; mov eax, dword [r12] (SIB, no displacement).
            (&[0x41, 0x8b, 0x45, 0x10], load(4, 0, 4)),
            (&[0x41, 0x8b, 0x04, 0x24], load(4, 0, 4)),
            // mov dword [r13+0x18], 0x51; mov dword [r12+2], 0xdeadbeef (misaligned).
            (
                &[0x41, 0xc7, 0x45, 0x18, 0x51, 0, 0, 0],
                store(4, Source::Imm(0x51)),
            ),
            (
                &[0x41, 0xc7, 0x44, 0x24, 0x02, 0xef, 0xbe, 0xad, 0xde],
                store(4, Source::Imm(0xdead_beef)),
            ),
            // mov word [r12+8], 0x1234.
            (
                &[0x66, 0x41, 0xc7, 0x44, 0x24, 0x08, 0x34, 0x12],
                store(2, Source::Imm(0x1234)),
            ),
            // mov dword [r13+0x10], eax; mov byte [rcx], sil (REX: SIL, not DH).
            (&[0x41, 0x89, 0x45, 0x10], store(4, Source::Reg(r(0)))),
            (&[0x40, 0x88, 0x31], store(1, Source::Reg(r(6)))),
            // movzx eax, byte [rdi+4]; movzx rax, byte [r12+8]; mov rcx, qword [r12+4].
            (&[0x0f, 0xb6, 0x47, 0x04], load(1, 0, 4)),
            (&[0x49, 0x0f, 0xb6, 0x44, 0x24, 0x08], load(1, 0, 8)),
            (&[0x49, 0x8b, 0x4c, 0x24, 0x04], load(8, 1, 8)),
            // cmp dword [r14+0x1c], 0: `read_volatile(..) == 0` folded into a compare.
            (
                &[0x41, 0x83, 0x7e, 0x1c, 0x00],
                MmioOp::Compare {
                    size: 4,
                    src: Source::Imm(0),
                    mem_left: true,
                    test: false,
                },
            ),
            // add eax, dword [rdx+0x18]: `sum.wrapping_add(read_volatile(..))` folded.
            (
                &[0x03, 0x42, 0x18],
                MmioOp::Alu {
                    size: 4,
                    op: AluOp::Add,
                    dst: r(0),
                },
            ),
            // cmp dword [rdi+0xc], ebx.
            (
                &[0x39, 0x5f, 0x0c],
                MmioOp::Compare {
                    size: 4,
                    src: Source::Reg(r(3)),
                    mem_left: true,
                    test: false,
                },
            ),
        ];
        for (bytes, op) in cases {
            let d = decode(bytes).unwrap();
            assert_eq!(usize::from(d.len), bytes.len(), "{bytes:x?}");
            assert_eq!(d.op, *op, "{bytes:x?}");
        }
    }

    #[test]
    fn refused_forms() {
        // Read-modify-write: add dword [rax], 1; not dword [rax].
        assert_eq!(
            decode(&[0x83, 0x00, 0x01]),
            Err(DecodeError::Unsupported(0x83))
        );
        assert_eq!(decode(&[0xf7, 0x10]), Err(DecodeError::Unsupported(0xf7)));
        // Register operand: mov eax, ecx.
        assert_eq!(decode(&[0x8b, 0xc1]), Err(DecodeError::NotMemory));
        // LOCK, REP.
        assert_eq!(decode(&[0xf0, 0x89, 0x01]), Err(DecodeError::Invalid));
        assert_eq!(decode(&[0xf3, 0x89, 0x01]), Err(DecodeError::Invalid));
        // C7 /1 is not MOV.
        assert_eq!(decode(&[0xc7, 0x08, 0, 0, 0, 0]), Err(DecodeError::Invalid));
        // Other opcodes: add [rcx], eax; movs; or [rax], imm.
        assert_eq!(decode(&[0x01, 0x01]), Err(DecodeError::Unsupported(0x01)));
        assert_eq!(decode(&[0xa5]), Err(DecodeError::Unsupported(0xa5)));
        assert_eq!(
            decode(&[0x0f, 0xbe, 0x01]),
            Err(DecodeError::Unsupported(0x0fbe))
        );
        // Sixteen prefixes.
        assert_eq!(decode(&[0x66; 16]), Err(DecodeError::TooLong));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
    }

    #[test]
    fn rex_counts_only_right_before_the_opcode() {
        // REX.W then 66: the REX is ignored, a 16-bit store.
        let d = decode(&[0x48, 0x66, 0x89, 0x01]).unwrap();
        assert_eq!(
            d.op,
            MmioOp::Store {
                size: 2,
                src: Source::Reg(Gpr {
                    index: 0,
                    high_byte: false
                })
            }
        );
        assert_eq!(d.len, 4);
    }
}
