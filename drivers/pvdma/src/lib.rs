//! Guest-side paravirtual DMA driver (being written).
#![no_std]
