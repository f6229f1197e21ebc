//! The interrupt descriptor table: one asm entry stub per vector (pushing a dummy error code
//! where the CPU pushes none), a common stub that saves every general-purpose register into a
//! [`TrapFrame`] and calls [`moat_trap_dispatch`]. Exceptions in the hypervisor are fatal: the
//! handler prints a register dump and ends the run with [`ExitCode::Exception`].

use crate::arch::x86;
use crate::exit::{self, ExitCode};

/// Vector for spurious local-APIC interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// Interrupt handlers for vectors 32..=254, as function addresses (0 = none).
static HANDLERS: [core::sync::atomic::AtomicUsize; 256] =
    [const { core::sync::atomic::AtomicUsize::new(0) }; 256];

/// Installs `handler` for `vector` (>= 32). It runs with interrupts off, on the interrupted
/// stack, before the EOI; it must not take locks the interrupted code may hold (use
/// `try_lock`).
pub fn register(vector: u8, handler: fn()) {
    assert!(
        vector >= 32 && vector != SPURIOUS_VECTOR,
        "vector {vector} is reserved"
    );
    HANDLERS[vector as usize].store(handler as usize, core::sync::atomic::Ordering::SeqCst);
}

/// Registers saved on entry, in stack order (lowest address first).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}
const _: () = assert!(core::mem::size_of::<TrapFrame>() == 22 * 8);

core::arch::global_asm!(
    r#"
    .section .text.isr, "ax"
    .code64
moat_isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call moat_trap_dispatch
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
    .balign 16; moat_isr_0: push 0; push 0; jmp moat_isr_common
    .balign 16; moat_isr_1: push 0; push 1; jmp moat_isr_common
    .balign 16; moat_isr_2: push 0; push 2; jmp moat_isr_common
    .balign 16; moat_isr_3: push 0; push 3; jmp moat_isr_common
    .balign 16; moat_isr_4: push 0; push 4; jmp moat_isr_common
    .balign 16; moat_isr_5: push 0; push 5; jmp moat_isr_common
    .balign 16; moat_isr_6: push 0; push 6; jmp moat_isr_common
    .balign 16; moat_isr_7: push 0; push 7; jmp moat_isr_common
    .balign 16; moat_isr_8: push 8; jmp moat_isr_common
    .balign 16; moat_isr_9: push 0; push 9; jmp moat_isr_common
    .balign 16; moat_isr_10: push 10; jmp moat_isr_common
    .balign 16; moat_isr_11: push 11; jmp moat_isr_common
    .balign 16; moat_isr_12: push 12; jmp moat_isr_common
    .balign 16; moat_isr_13: push 13; jmp moat_isr_common
    .balign 16; moat_isr_14: push 14; jmp moat_isr_common
    .balign 16; moat_isr_15: push 0; push 15; jmp moat_isr_common
    .balign 16; moat_isr_16: push 0; push 16; jmp moat_isr_common
    .balign 16; moat_isr_17: push 17; jmp moat_isr_common
    .balign 16; moat_isr_18: push 0; push 18; jmp moat_isr_common
    .balign 16; moat_isr_19: push 0; push 19; jmp moat_isr_common
    .balign 16; moat_isr_20: push 0; push 20; jmp moat_isr_common
    .balign 16; moat_isr_21: push 21; jmp moat_isr_common
    .balign 16; moat_isr_22: push 0; push 22; jmp moat_isr_common
    .balign 16; moat_isr_23: push 0; push 23; jmp moat_isr_common
    .balign 16; moat_isr_24: push 0; push 24; jmp moat_isr_common
    .balign 16; moat_isr_25: push 0; push 25; jmp moat_isr_common
    .balign 16; moat_isr_26: push 0; push 26; jmp moat_isr_common
    .balign 16; moat_isr_27: push 0; push 27; jmp moat_isr_common
    .balign 16; moat_isr_28: push 0; push 28; jmp moat_isr_common
    .balign 16; moat_isr_29: push 29; jmp moat_isr_common
    .balign 16; moat_isr_30: push 30; jmp moat_isr_common
    .balign 16; moat_isr_31: push 0; push 31; jmp moat_isr_common
    .balign 16; moat_isr_32: push 0; push 32; jmp moat_isr_common
    .balign 16; moat_isr_33: push 0; push 33; jmp moat_isr_common
    .balign 16; moat_isr_34: push 0; push 34; jmp moat_isr_common
    .balign 16; moat_isr_35: push 0; push 35; jmp moat_isr_common
    .balign 16; moat_isr_36: push 0; push 36; jmp moat_isr_common
    .balign 16; moat_isr_37: push 0; push 37; jmp moat_isr_common
    .balign 16; moat_isr_38: push 0; push 38; jmp moat_isr_common
    .balign 16; moat_isr_39: push 0; push 39; jmp moat_isr_common
    .balign 16; moat_isr_40: push 0; push 40; jmp moat_isr_common
    .balign 16; moat_isr_41: push 0; push 41; jmp moat_isr_common
    .balign 16; moat_isr_42: push 0; push 42; jmp moat_isr_common
    .balign 16; moat_isr_43: push 0; push 43; jmp moat_isr_common
    .balign 16; moat_isr_44: push 0; push 44; jmp moat_isr_common
    .balign 16; moat_isr_45: push 0; push 45; jmp moat_isr_common
    .balign 16; moat_isr_46: push 0; push 46; jmp moat_isr_common
    .balign 16; moat_isr_47: push 0; push 47; jmp moat_isr_common
    .balign 16; moat_isr_48: push 0; push 48; jmp moat_isr_common
    .balign 16; moat_isr_49: push 0; push 49; jmp moat_isr_common
    .balign 16; moat_isr_50: push 0; push 50; jmp moat_isr_common
    .balign 16; moat_isr_51: push 0; push 51; jmp moat_isr_common
    .balign 16; moat_isr_52: push 0; push 52; jmp moat_isr_common
    .balign 16; moat_isr_53: push 0; push 53; jmp moat_isr_common
    .balign 16; moat_isr_54: push 0; push 54; jmp moat_isr_common
    .balign 16; moat_isr_55: push 0; push 55; jmp moat_isr_common
    .balign 16; moat_isr_56: push 0; push 56; jmp moat_isr_common
    .balign 16; moat_isr_57: push 0; push 57; jmp moat_isr_common
    .balign 16; moat_isr_58: push 0; push 58; jmp moat_isr_common
    .balign 16; moat_isr_59: push 0; push 59; jmp moat_isr_common
    .balign 16; moat_isr_60: push 0; push 60; jmp moat_isr_common
    .balign 16; moat_isr_61: push 0; push 61; jmp moat_isr_common
    .balign 16; moat_isr_62: push 0; push 62; jmp moat_isr_common
    .balign 16; moat_isr_63: push 0; push 63; jmp moat_isr_common
    .balign 16; moat_isr_64: push 0; push 64; jmp moat_isr_common
    .balign 16; moat_isr_65: push 0; push 65; jmp moat_isr_common
    .balign 16; moat_isr_66: push 0; push 66; jmp moat_isr_common
    .balign 16; moat_isr_67: push 0; push 67; jmp moat_isr_common
    .balign 16; moat_isr_68: push 0; push 68; jmp moat_isr_common
    .balign 16; moat_isr_69: push 0; push 69; jmp moat_isr_common
    .balign 16; moat_isr_70: push 0; push 70; jmp moat_isr_common
    .balign 16; moat_isr_71: push 0; push 71; jmp moat_isr_common
    .balign 16; moat_isr_72: push 0; push 72; jmp moat_isr_common
    .balign 16; moat_isr_73: push 0; push 73; jmp moat_isr_common
    .balign 16; moat_isr_74: push 0; push 74; jmp moat_isr_common
    .balign 16; moat_isr_75: push 0; push 75; jmp moat_isr_common
    .balign 16; moat_isr_76: push 0; push 76; jmp moat_isr_common
    .balign 16; moat_isr_77: push 0; push 77; jmp moat_isr_common
    .balign 16; moat_isr_78: push 0; push 78; jmp moat_isr_common
    .balign 16; moat_isr_79: push 0; push 79; jmp moat_isr_common
    .balign 16; moat_isr_80: push 0; push 80; jmp moat_isr_common
    .balign 16; moat_isr_81: push 0; push 81; jmp moat_isr_common
    .balign 16; moat_isr_82: push 0; push 82; jmp moat_isr_common
    .balign 16; moat_isr_83: push 0; push 83; jmp moat_isr_common
    .balign 16; moat_isr_84: push 0; push 84; jmp moat_isr_common
    .balign 16; moat_isr_85: push 0; push 85; jmp moat_isr_common
    .balign 16; moat_isr_86: push 0; push 86; jmp moat_isr_common
    .balign 16; moat_isr_87: push 0; push 87; jmp moat_isr_common
    .balign 16; moat_isr_88: push 0; push 88; jmp moat_isr_common
    .balign 16; moat_isr_89: push 0; push 89; jmp moat_isr_common
    .balign 16; moat_isr_90: push 0; push 90; jmp moat_isr_common
    .balign 16; moat_isr_91: push 0; push 91; jmp moat_isr_common
    .balign 16; moat_isr_92: push 0; push 92; jmp moat_isr_common
    .balign 16; moat_isr_93: push 0; push 93; jmp moat_isr_common
    .balign 16; moat_isr_94: push 0; push 94; jmp moat_isr_common
    .balign 16; moat_isr_95: push 0; push 95; jmp moat_isr_common
    .balign 16; moat_isr_96: push 0; push 96; jmp moat_isr_common
    .balign 16; moat_isr_97: push 0; push 97; jmp moat_isr_common
    .balign 16; moat_isr_98: push 0; push 98; jmp moat_isr_common
    .balign 16; moat_isr_99: push 0; push 99; jmp moat_isr_common
    .balign 16; moat_isr_100: push 0; push 100; jmp moat_isr_common
    .balign 16; moat_isr_101: push 0; push 101; jmp moat_isr_common
    .balign 16; moat_isr_102: push 0; push 102; jmp moat_isr_common
    .balign 16; moat_isr_103: push 0; push 103; jmp moat_isr_common
    .balign 16; moat_isr_104: push 0; push 104; jmp moat_isr_common
    .balign 16; moat_isr_105: push 0; push 105; jmp moat_isr_common
    .balign 16; moat_isr_106: push 0; push 106; jmp moat_isr_common
    .balign 16; moat_isr_107: push 0; push 107; jmp moat_isr_common
    .balign 16; moat_isr_108: push 0; push 108; jmp moat_isr_common
    .balign 16; moat_isr_109: push 0; push 109; jmp moat_isr_common
    .balign 16; moat_isr_110: push 0; push 110; jmp moat_isr_common
    .balign 16; moat_isr_111: push 0; push 111; jmp moat_isr_common
    .balign 16; moat_isr_112: push 0; push 112; jmp moat_isr_common
    .balign 16; moat_isr_113: push 0; push 113; jmp moat_isr_common
    .balign 16; moat_isr_114: push 0; push 114; jmp moat_isr_common
    .balign 16; moat_isr_115: push 0; push 115; jmp moat_isr_common
    .balign 16; moat_isr_116: push 0; push 116; jmp moat_isr_common
    .balign 16; moat_isr_117: push 0; push 117; jmp moat_isr_common
    .balign 16; moat_isr_118: push 0; push 118; jmp moat_isr_common
    .balign 16; moat_isr_119: push 0; push 119; jmp moat_isr_common
    .balign 16; moat_isr_120: push 0; push 120; jmp moat_isr_common
    .balign 16; moat_isr_121: push 0; push 121; jmp moat_isr_common
    .balign 16; moat_isr_122: push 0; push 122; jmp moat_isr_common
    .balign 16; moat_isr_123: push 0; push 123; jmp moat_isr_common
    .balign 16; moat_isr_124: push 0; push 124; jmp moat_isr_common
    .balign 16; moat_isr_125: push 0; push 125; jmp moat_isr_common
    .balign 16; moat_isr_126: push 0; push 126; jmp moat_isr_common
    .balign 16; moat_isr_127: push 0; push 127; jmp moat_isr_common
    .balign 16; moat_isr_128: push 0; push 128; jmp moat_isr_common
    .balign 16; moat_isr_129: push 0; push 129; jmp moat_isr_common
    .balign 16; moat_isr_130: push 0; push 130; jmp moat_isr_common
    .balign 16; moat_isr_131: push 0; push 131; jmp moat_isr_common
    .balign 16; moat_isr_132: push 0; push 132; jmp moat_isr_common
    .balign 16; moat_isr_133: push 0; push 133; jmp moat_isr_common
    .balign 16; moat_isr_134: push 0; push 134; jmp moat_isr_common
    .balign 16; moat_isr_135: push 0; push 135; jmp moat_isr_common
    .balign 16; moat_isr_136: push 0; push 136; jmp moat_isr_common
    .balign 16; moat_isr_137: push 0; push 137; jmp moat_isr_common
    .balign 16; moat_isr_138: push 0; push 138; jmp moat_isr_common
    .balign 16; moat_isr_139: push 0; push 139; jmp moat_isr_common
    .balign 16; moat_isr_140: push 0; push 140; jmp moat_isr_common
    .balign 16; moat_isr_141: push 0; push 141; jmp moat_isr_common
    .balign 16; moat_isr_142: push 0; push 142; jmp moat_isr_common
    .balign 16; moat_isr_143: push 0; push 143; jmp moat_isr_common
    .balign 16; moat_isr_144: push 0; push 144; jmp moat_isr_common
    .balign 16; moat_isr_145: push 0; push 145; jmp moat_isr_common
    .balign 16; moat_isr_146: push 0; push 146; jmp moat_isr_common
    .balign 16; moat_isr_147: push 0; push 147; jmp moat_isr_common
    .balign 16; moat_isr_148: push 0; push 148; jmp moat_isr_common
    .balign 16; moat_isr_149: push 0; push 149; jmp moat_isr_common
    .balign 16; moat_isr_150: push 0; push 150; jmp moat_isr_common
    .balign 16; moat_isr_151: push 0; push 151; jmp moat_isr_common
    .balign 16; moat_isr_152: push 0; push 152; jmp moat_isr_common
    .balign 16; moat_isr_153: push 0; push 153; jmp moat_isr_common
    .balign 16; moat_isr_154: push 0; push 154; jmp moat_isr_common
    .balign 16; moat_isr_155: push 0; push 155; jmp moat_isr_common
    .balign 16; moat_isr_156: push 0; push 156; jmp moat_isr_common
    .balign 16; moat_isr_157: push 0; push 157; jmp moat_isr_common
    .balign 16; moat_isr_158: push 0; push 158; jmp moat_isr_common
    .balign 16; moat_isr_159: push 0; push 159; jmp moat_isr_common
    .balign 16; moat_isr_160: push 0; push 160; jmp moat_isr_common
    .balign 16; moat_isr_161: push 0; push 161; jmp moat_isr_common
    .balign 16; moat_isr_162: push 0; push 162; jmp moat_isr_common
    .balign 16; moat_isr_163: push 0; push 163; jmp moat_isr_common
    .balign 16; moat_isr_164: push 0; push 164; jmp moat_isr_common
    .balign 16; moat_isr_165: push 0; push 165; jmp moat_isr_common
    .balign 16; moat_isr_166: push 0; push 166; jmp moat_isr_common
    .balign 16; moat_isr_167: push 0; push 167; jmp moat_isr_common
    .balign 16; moat_isr_168: push 0; push 168; jmp moat_isr_common
    .balign 16; moat_isr_169: push 0; push 169; jmp moat_isr_common
    .balign 16; moat_isr_170: push 0; push 170; jmp moat_isr_common
    .balign 16; moat_isr_171: push 0; push 171; jmp moat_isr_common
    .balign 16; moat_isr_172: push 0; push 172; jmp moat_isr_common
    .balign 16; moat_isr_173: push 0; push 173; jmp moat_isr_common
    .balign 16; moat_isr_174: push 0; push 174; jmp moat_isr_common
    .balign 16; moat_isr_175: push 0; push 175; jmp moat_isr_common
    .balign 16; moat_isr_176: push 0; push 176; jmp moat_isr_common
    .balign 16; moat_isr_177: push 0; push 177; jmp moat_isr_common
    .balign 16; moat_isr_178: push 0; push 178; jmp moat_isr_common
    .balign 16; moat_isr_179: push 0; push 179; jmp moat_isr_common
    .balign 16; moat_isr_180: push 0; push 180; jmp moat_isr_common
    .balign 16; moat_isr_181: push 0; push 181; jmp moat_isr_common
    .balign 16; moat_isr_182: push 0; push 182; jmp moat_isr_common
    .balign 16; moat_isr_183: push 0; push 183; jmp moat_isr_common
    .balign 16; moat_isr_184: push 0; push 184; jmp moat_isr_common
    .balign 16; moat_isr_185: push 0; push 185; jmp moat_isr_common
    .balign 16; moat_isr_186: push 0; push 186; jmp moat_isr_common
    .balign 16; moat_isr_187: push 0; push 187; jmp moat_isr_common
    .balign 16; moat_isr_188: push 0; push 188; jmp moat_isr_common
    .balign 16; moat_isr_189: push 0; push 189; jmp moat_isr_common
    .balign 16; moat_isr_190: push 0; push 190; jmp moat_isr_common
    .balign 16; moat_isr_191: push 0; push 191; jmp moat_isr_common
    .balign 16; moat_isr_192: push 0; push 192; jmp moat_isr_common
    .balign 16; moat_isr_193: push 0; push 193; jmp moat_isr_common
    .balign 16; moat_isr_194: push 0; push 194; jmp moat_isr_common
    .balign 16; moat_isr_195: push 0; push 195; jmp moat_isr_common
    .balign 16; moat_isr_196: push 0; push 196; jmp moat_isr_common
    .balign 16; moat_isr_197: push 0; push 197; jmp moat_isr_common
    .balign 16; moat_isr_198: push 0; push 198; jmp moat_isr_common
    .balign 16; moat_isr_199: push 0; push 199; jmp moat_isr_common
    .balign 16; moat_isr_200: push 0; push 200; jmp moat_isr_common
    .balign 16; moat_isr_201: push 0; push 201; jmp moat_isr_common
    .balign 16; moat_isr_202: push 0; push 202; jmp moat_isr_common
    .balign 16; moat_isr_203: push 0; push 203; jmp moat_isr_common
    .balign 16; moat_isr_204: push 0; push 204; jmp moat_isr_common
    .balign 16; moat_isr_205: push 0; push 205; jmp moat_isr_common
    .balign 16; moat_isr_206: push 0; push 206; jmp moat_isr_common
    .balign 16; moat_isr_207: push 0; push 207; jmp moat_isr_common
    .balign 16; moat_isr_208: push 0; push 208; jmp moat_isr_common
    .balign 16; moat_isr_209: push 0; push 209; jmp moat_isr_common
    .balign 16; moat_isr_210: push 0; push 210; jmp moat_isr_common
    .balign 16; moat_isr_211: push 0; push 211; jmp moat_isr_common
    .balign 16; moat_isr_212: push 0; push 212; jmp moat_isr_common
    .balign 16; moat_isr_213: push 0; push 213; jmp moat_isr_common
    .balign 16; moat_isr_214: push 0; push 214; jmp moat_isr_common
    .balign 16; moat_isr_215: push 0; push 215; jmp moat_isr_common
    .balign 16; moat_isr_216: push 0; push 216; jmp moat_isr_common
    .balign 16; moat_isr_217: push 0; push 217; jmp moat_isr_common
    .balign 16; moat_isr_218: push 0; push 218; jmp moat_isr_common
    .balign 16; moat_isr_219: push 0; push 219; jmp moat_isr_common
    .balign 16; moat_isr_220: push 0; push 220; jmp moat_isr_common
    .balign 16; moat_isr_221: push 0; push 221; jmp moat_isr_common
    .balign 16; moat_isr_222: push 0; push 222; jmp moat_isr_common
    .balign 16; moat_isr_223: push 0; push 223; jmp moat_isr_common
    .balign 16; moat_isr_224: push 0; push 224; jmp moat_isr_common
    .balign 16; moat_isr_225: push 0; push 225; jmp moat_isr_common
    .balign 16; moat_isr_226: push 0; push 226; jmp moat_isr_common
    .balign 16; moat_isr_227: push 0; push 227; jmp moat_isr_common
    .balign 16; moat_isr_228: push 0; push 228; jmp moat_isr_common
    .balign 16; moat_isr_229: push 0; push 229; jmp moat_isr_common
    .balign 16; moat_isr_230: push 0; push 230; jmp moat_isr_common
    .balign 16; moat_isr_231: push 0; push 231; jmp moat_isr_common
    .balign 16; moat_isr_232: push 0; push 232; jmp moat_isr_common
    .balign 16; moat_isr_233: push 0; push 233; jmp moat_isr_common
    .balign 16; moat_isr_234: push 0; push 234; jmp moat_isr_common
    .balign 16; moat_isr_235: push 0; push 235; jmp moat_isr_common
    .balign 16; moat_isr_236: push 0; push 236; jmp moat_isr_common
    .balign 16; moat_isr_237: push 0; push 237; jmp moat_isr_common
    .balign 16; moat_isr_238: push 0; push 238; jmp moat_isr_common
    .balign 16; moat_isr_239: push 0; push 239; jmp moat_isr_common
    .balign 16; moat_isr_240: push 0; push 240; jmp moat_isr_common
    .balign 16; moat_isr_241: push 0; push 241; jmp moat_isr_common
    .balign 16; moat_isr_242: push 0; push 242; jmp moat_isr_common
    .balign 16; moat_isr_243: push 0; push 243; jmp moat_isr_common
    .balign 16; moat_isr_244: push 0; push 244; jmp moat_isr_common
    .balign 16; moat_isr_245: push 0; push 245; jmp moat_isr_common
    .balign 16; moat_isr_246: push 0; push 246; jmp moat_isr_common
    .balign 16; moat_isr_247: push 0; push 247; jmp moat_isr_common
    .balign 16; moat_isr_248: push 0; push 248; jmp moat_isr_common
    .balign 16; moat_isr_249: push 0; push 249; jmp moat_isr_common
    .balign 16; moat_isr_250: push 0; push 250; jmp moat_isr_common
    .balign 16; moat_isr_251: push 0; push 251; jmp moat_isr_common
    .balign 16; moat_isr_252: push 0; push 252; jmp moat_isr_common
    .balign 16; moat_isr_253: push 0; push 253; jmp moat_isr_common
    .balign 16; moat_isr_254: push 0; push 254; jmp moat_isr_common
    .balign 16; moat_isr_255: push 0; push 255; jmp moat_isr_common
    .section .rodata.isr_table, "a"
    .balign 8
    .global moat_isr_table
moat_isr_table:
    .quad moat_isr_0, moat_isr_1, moat_isr_2, moat_isr_3, moat_isr_4, moat_isr_5, moat_isr_6, moat_isr_7
    .quad moat_isr_8, moat_isr_9, moat_isr_10, moat_isr_11, moat_isr_12, moat_isr_13, moat_isr_14, moat_isr_15
    .quad moat_isr_16, moat_isr_17, moat_isr_18, moat_isr_19, moat_isr_20, moat_isr_21, moat_isr_22, moat_isr_23
    .quad moat_isr_24, moat_isr_25, moat_isr_26, moat_isr_27, moat_isr_28, moat_isr_29, moat_isr_30, moat_isr_31
    .quad moat_isr_32, moat_isr_33, moat_isr_34, moat_isr_35, moat_isr_36, moat_isr_37, moat_isr_38, moat_isr_39
    .quad moat_isr_40, moat_isr_41, moat_isr_42, moat_isr_43, moat_isr_44, moat_isr_45, moat_isr_46, moat_isr_47
    .quad moat_isr_48, moat_isr_49, moat_isr_50, moat_isr_51, moat_isr_52, moat_isr_53, moat_isr_54, moat_isr_55
    .quad moat_isr_56, moat_isr_57, moat_isr_58, moat_isr_59, moat_isr_60, moat_isr_61, moat_isr_62, moat_isr_63
    .quad moat_isr_64, moat_isr_65, moat_isr_66, moat_isr_67, moat_isr_68, moat_isr_69, moat_isr_70, moat_isr_71
    .quad moat_isr_72, moat_isr_73, moat_isr_74, moat_isr_75, moat_isr_76, moat_isr_77, moat_isr_78, moat_isr_79
    .quad moat_isr_80, moat_isr_81, moat_isr_82, moat_isr_83, moat_isr_84, moat_isr_85, moat_isr_86, moat_isr_87
    .quad moat_isr_88, moat_isr_89, moat_isr_90, moat_isr_91, moat_isr_92, moat_isr_93, moat_isr_94, moat_isr_95
    .quad moat_isr_96, moat_isr_97, moat_isr_98, moat_isr_99, moat_isr_100, moat_isr_101, moat_isr_102, moat_isr_103
    .quad moat_isr_104, moat_isr_105, moat_isr_106, moat_isr_107, moat_isr_108, moat_isr_109, moat_isr_110, moat_isr_111
    .quad moat_isr_112, moat_isr_113, moat_isr_114, moat_isr_115, moat_isr_116, moat_isr_117, moat_isr_118, moat_isr_119
    .quad moat_isr_120, moat_isr_121, moat_isr_122, moat_isr_123, moat_isr_124, moat_isr_125, moat_isr_126, moat_isr_127
    .quad moat_isr_128, moat_isr_129, moat_isr_130, moat_isr_131, moat_isr_132, moat_isr_133, moat_isr_134, moat_isr_135
    .quad moat_isr_136, moat_isr_137, moat_isr_138, moat_isr_139, moat_isr_140, moat_isr_141, moat_isr_142, moat_isr_143
    .quad moat_isr_144, moat_isr_145, moat_isr_146, moat_isr_147, moat_isr_148, moat_isr_149, moat_isr_150, moat_isr_151
    .quad moat_isr_152, moat_isr_153, moat_isr_154, moat_isr_155, moat_isr_156, moat_isr_157, moat_isr_158, moat_isr_159
    .quad moat_isr_160, moat_isr_161, moat_isr_162, moat_isr_163, moat_isr_164, moat_isr_165, moat_isr_166, moat_isr_167
    .quad moat_isr_168, moat_isr_169, moat_isr_170, moat_isr_171, moat_isr_172, moat_isr_173, moat_isr_174, moat_isr_175
    .quad moat_isr_176, moat_isr_177, moat_isr_178, moat_isr_179, moat_isr_180, moat_isr_181, moat_isr_182, moat_isr_183
    .quad moat_isr_184, moat_isr_185, moat_isr_186, moat_isr_187, moat_isr_188, moat_isr_189, moat_isr_190, moat_isr_191
    .quad moat_isr_192, moat_isr_193, moat_isr_194, moat_isr_195, moat_isr_196, moat_isr_197, moat_isr_198, moat_isr_199
    .quad moat_isr_200, moat_isr_201, moat_isr_202, moat_isr_203, moat_isr_204, moat_isr_205, moat_isr_206, moat_isr_207
    .quad moat_isr_208, moat_isr_209, moat_isr_210, moat_isr_211, moat_isr_212, moat_isr_213, moat_isr_214, moat_isr_215
    .quad moat_isr_216, moat_isr_217, moat_isr_218, moat_isr_219, moat_isr_220, moat_isr_221, moat_isr_222, moat_isr_223
    .quad moat_isr_224, moat_isr_225, moat_isr_226, moat_isr_227, moat_isr_228, moat_isr_229, moat_isr_230, moat_isr_231
    .quad moat_isr_232, moat_isr_233, moat_isr_234, moat_isr_235, moat_isr_236, moat_isr_237, moat_isr_238, moat_isr_239
    .quad moat_isr_240, moat_isr_241, moat_isr_242, moat_isr_243, moat_isr_244, moat_isr_245, moat_isr_246, moat_isr_247
    .quad moat_isr_248, moat_isr_249, moat_isr_250, moat_isr_251, moat_isr_252, moat_isr_253, moat_isr_254, moat_isr_255
"#
);

/// An IDT gate descriptor.
#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_hi: u32,
    _zero: u32,
}
const _: () = assert!(core::mem::size_of::<Gate>() == 16);

impl Gate {
    const MISSING: Gate = Gate {
        offset_lo: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_hi: 0,
        _zero: 0,
    };

    /// A present, DPL 0, 64-bit interrupt gate (interrupts off on entry).
    const fn interrupt(handler: u64, ist: u8) -> Gate {
        Gate {
            offset_lo: handler as u16,
            selector: super::cpu::KERNEL_CS,
            ist,
            attributes: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_hi: (handler >> 32) as u32,
            _zero: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: spin::Once<Idt> = spin::Once::new();

fn build() -> Idt {
    extern "C" {
        static moat_isr_table: [u64; 256];
    }
    let mut idt = Idt([Gate::MISSING; 256]);
    for (v, gate) in idt.0.iter_mut().enumerate() {
        // SAFETY: the table is immutable data defined in the asm above, 256 entries.
        let handler = unsafe { moat_isr_table[v] };
        // #DF, NMI and #MC run on IST1 so a broken stack cannot turn them into a triple fault.
        let ist = if matches!(v, 2 | 8 | 18) { 1 } else { 0 };
        *gate = Gate::interrupt(handler, ist);
    }
    idt
}

/// Loads the IDT on this CPU (building it on first use).
pub fn load() {
    let idt = IDT.call_once(build);
    #[repr(C, packed(2))]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as *const Idt as u64,
    };
    // SAFETY: the IDT is 'static and every gate points at a stub in this image.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags))
    };
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// Prints a register dump of `f` on the emergency console.
pub fn dump(f: &TrapFrame) {
    use core::fmt::Write;
    let mut w = crate::console::Emergency;
    let _ = writeln!(
        w,
        "  rip={:#018x} cs={:#06x} rflags={:#010x} err={:#x}",
        f.rip, f.cs, f.rflags, f.error
    );
    let _ = writeln!(
        w,
        "  rsp={:#018x} ss={:#06x} cr2={:#018x} cr3={:#018x}",
        f.rsp,
        f.ss,
        x86::read_cr(2),
        x86::read_cr(3)
    );
    let _ = writeln!(
        w,
        "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
        f.rax, f.rbx, f.rcx, f.rdx
    );
    let _ = writeln!(
        w,
        "  rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
        f.rsi, f.rdi, f.rbp, f.r8
    );
    let _ = writeln!(
        w,
        "  r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}",
        f.r9, f.r10, f.r11, f.r12
    );
    let _ = writeln!(
        w,
        "  r13={:#018x} r14={:#018x} r15={:#018x}",
        f.r13, f.r14, f.r15
    );
    let _ = writeln!(w, "  cr0={:#x} cr4={:#x}", x86::read_cr(0), x86::read_cr(4));
}

/// Called by the common stub with interrupts off.
#[no_mangle]
extern "C" fn moat_trap_dispatch(f: &mut TrapFrame) {
    let v = f.vector as usize;
    if v < 32 {
        crate::console::print_emergency(format_args!(
            "\nmoat: FATAL exception {} (vector {}) on cpu{}\n",
            EXCEPTION_NAMES[v],
            v,
            super::cpu::current_index()
        ));
        dump(f);
        exit::exit(ExitCode::Exception);
    }
    if v == SPURIOUS_VECTOR as usize {
        return;
    }
    let h = HANDLERS[v].load(core::sync::atomic::Ordering::SeqCst);
    if h != 0 {
        // SAFETY: only `register` stores into HANDLERS, and it stores `fn()` addresses.
        let handler: fn() = unsafe { core::mem::transmute::<usize, fn()>(h) };
        handler();
        super::apic::eoi();
        return;
    }
    super::apic::eoi();
    log::warn!("unexpected interrupt vector {v}");
}
