//! Why a DMA call failed: an ABI error status itself ([`moat_abi::Error`], the non-OK half of
//! [`moat_abi::Status`]), which the kernel returns to the guest as it is. A failed call changed
//! nothing.

pub use moat_abi::Error;
