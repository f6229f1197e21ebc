//! The fault ring: VT-d faults on the guest's domain, delivered into guest memory.

use super::PAGE_SIZE;
use core::mem::offset_of;
use zerocopy::little_endian::{U16, U32, U64};

/// `magic` of a [`FaultRingHeader`]: the bytes `"MFLT"`.
pub const FAULT_RING_MAGIC: u32 = u32::from_le_bytes(*b"MFLT");
/// `version` of a [`FaultRingHeader`].
pub const FAULT_RING_VERSION: u16 = 1;
/// Bytes of a [`FaultRingHeader`]; record slot 0 starts at this offset.
pub const FAULT_RING_HEADER_SIZE: usize = 64;
/// Bytes of a [`FaultRecord`].
pub const FAULT_RECORD_SIZE: usize = 32;
/// Most pages of a fault ring (`DMA_FAULT_RING_REGISTER` RSI).
pub const MAX_FAULT_RING_PAGES: u64 = 16;

/// Record slots in a ring of `pages` pages (0 for 0 pages; `pages` is capped at
/// [`MAX_FAULT_RING_PAGES`]).
pub const fn fault_ring_capacity(pages: u64) -> u32 {
    if pages == 0 {
        return 0;
    }
    let pages = if pages > MAX_FAULT_RING_PAGES {
        MAX_FAULT_RING_PAGES
    } else {
        pages
    };
    ((pages * PAGE_SIZE - FAULT_RING_HEADER_SIZE as u64) / FAULT_RECORD_SIZE as u64) as u32
}

abi_struct! {
    /// The fault ring header (64 bytes, little-endian) at offset 0 of the ring area.
    ///
    /// | offset | size | field | written by | meaning |
    /// |---|---|---|---|---|
    /// | 0 | 4 | `magic` | hypervisor at registration | [`FAULT_RING_MAGIC`] |
    /// | 4 | 2 | `version` | hypervisor at registration | [`FAULT_RING_VERSION`] |
    /// | 6 | 2 | `record_size` | hypervisor at registration | [`FAULT_RECORD_SIZE`] |
    /// | 8 | 4 | `capacity` | hypervisor at registration | record slots |
    /// | 12 | 4 | `reserved0` | — | 0 |
    /// | 16 | 4 | `producer` | hypervisor | records produced, free-running mod 2^32 |
    /// | 20 | 4 | `reserved1` | — | 0 |
    /// | 24 | 4 | `consumer` | guest | records consumed, free-running mod 2^32 |
    /// | 28 | 4 | `reserved2` | — | 0 |
    /// | 32 | 8 | `dropped` | hypervisor | faults not recorded because the ring was full |
    /// | 40 | 24 | `reserved` | — | 0 |
    ///
    /// Record *k* (counting from 0 since registration) is in slot `k % capacity`, at offset
    /// `64 + 32 * (k % capacity)`.
    pub struct FaultRingHeader: FAULT_RING_HEADER_SIZE {
        /// [`FAULT_RING_MAGIC`].
        pub magic: U32 @ 0,
        /// [`FAULT_RING_VERSION`].
        pub version: U16 @ 4,
        /// [`FAULT_RECORD_SIZE`].
        pub record_size: U16 @ 6,
        /// Record slots.
        pub capacity: U32 @ 8,
        /// 0.
        pub reserved0: U32 @ 12,
        /// Records produced.
        pub producer: U32 @ 16,
        /// 0.
        pub reserved1: U32 @ 20,
        /// Records consumed.
        pub consumer: U32 @ 24,
        /// 0.
        pub reserved2: U32 @ 28,
        /// Faults dropped.
        pub dropped: U64 @ 32,
        /// 0.
        pub reserved: [U64; 3] @ 40,
    }
}

impl FaultRingHeader {
    /// Byte offset of `producer`.
    pub const PRODUCER_OFFSET: usize = offset_of!(FaultRingHeader, producer);
    /// Byte offset of `consumer`.
    pub const CONSUMER_OFFSET: usize = offset_of!(FaultRingHeader, consumer);
    /// Byte offset of `dropped`.
    pub const DROPPED_OFFSET: usize = offset_of!(FaultRingHeader, dropped);

    /// The header the hypervisor writes at registration.
    pub const fn new(capacity: u32) -> FaultRingHeader {
        FaultRingHeader {
            magic: U32::new(FAULT_RING_MAGIC),
            version: U16::new(FAULT_RING_VERSION),
            record_size: U16::new(FAULT_RECORD_SIZE as u16),
            capacity: U32::new(capacity),
            reserved0: U32::ZERO,
            producer: U32::ZERO,
            reserved1: U32::ZERO,
            consumer: U32::ZERO,
            reserved2: U32::ZERO,
            dropped: U64::ZERO,
            reserved: [U64::ZERO; 3],
        }
    }

    /// Byte offset of the slot of record number `k`, or `None` for a zero capacity.
    pub const fn record_offset(capacity: u32, k: u32) -> Option<usize> {
        if capacity == 0 {
            None
        } else {
            Some(FAULT_RING_HEADER_SIZE + (k % capacity) as usize * FAULT_RECORD_SIZE)
        }
    }

    /// Records waiting to be consumed, or `None` when `producer - consumer` (mod 2^32)
    /// exceeds the capacity (a consumer index the guest corrupted; the hypervisor then treats
    /// the ring as full).
    pub const fn pending(&self) -> Option<u32> {
        let n = self.producer.get().wrapping_sub(self.consumer.get());
        if n > self.capacity.get() {
            None
        } else {
            Some(n)
        }
    }
}

abi_enum! {
    /// The direction of a faulting DMA request.
    pub enum Direction: u8 {
        /// The device tried to read memory.
        Read = 1,
        /// The device tried to write memory.
        Write = 2,
    }
}

abi_struct! {
    /// One fault record (32 bytes, little-endian).
    ///
    /// | offset | size | field | meaning |
    /// |---|---|---|---|
    /// | 0 | 8 | `iova` | faulting IOVA, page aligned (VT-d reports the page) |
    /// | 8 | 2 | `source_id` | PCI requester id: bus << 8 \| device << 3 \| function |
    /// | 10 | 1 | `reason` | VT-d fault reason code (e.g. 5 write denied, 6 read denied / not present) |
    /// | 11 | 1 | `direction` | [`Direction`] |
    /// | 12 | 4 | `reserved0` | 0 |
    /// | 16 | 8 | `seq` | the fault's number for this guest since registration, counting dropped ones (a gap = drops) |
    /// | 24 | 8 | `reserved1` | 0 |
    #[derive(Default)]
    pub struct FaultRecord: FAULT_RECORD_SIZE {
        /// Faulting IOVA (page).
        pub iova: U64 @ 0,
        /// PCI requester id.
        pub source_id: U16 @ 8,
        /// VT-d fault reason.
        pub reason: u8 @ 10,
        /// [`Direction`] as a byte.
        pub direction: u8 @ 11,
        /// 0.
        pub reserved0: U32 @ 12,
        /// Fault sequence number.
        pub seq: U64 @ 16,
        /// 0.
        pub reserved1: U64 @ 24,
    }
}

impl FaultRecord {
    /// The direction; `None` for an unknown byte.
    pub const fn direction(&self) -> Option<Direction> {
        Direction::from_raw(self.direction)
    }
}
