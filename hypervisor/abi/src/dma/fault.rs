//! The fault ring: VT-d faults on the guest's domain, delivered into guest memory.

use super::PAGE_SIZE;
use crate::le::{put_u16, put_u32, put_u64, u16_at, u32_at, u64_at};
use core::mem::{offset_of, size_of};

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
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRingHeader {
    /// [`FAULT_RING_MAGIC`].
    pub magic: u32,
    /// [`FAULT_RING_VERSION`].
    pub version: u16,
    /// [`FAULT_RECORD_SIZE`].
    pub record_size: u16,
    /// Record slots.
    pub capacity: u32,
    /// 0.
    pub reserved0: u32,
    /// Records produced.
    pub producer: u32,
    /// 0.
    pub reserved1: u32,
    /// Records consumed.
    pub consumer: u32,
    /// 0.
    pub reserved2: u32,
    /// Faults dropped.
    pub dropped: u64,
    /// 0.
    pub reserved: [u64; 3],
}

const _: () = {
    assert!(size_of::<FaultRingHeader>() == FAULT_RING_HEADER_SIZE);
    assert!(offset_of!(FaultRingHeader, magic) == 0);
    assert!(offset_of!(FaultRingHeader, version) == 4);
    assert!(offset_of!(FaultRingHeader, record_size) == 6);
    assert!(offset_of!(FaultRingHeader, capacity) == 8);
    assert!(offset_of!(FaultRingHeader, producer) == 16);
    assert!(offset_of!(FaultRingHeader, consumer) == 24);
    assert!(offset_of!(FaultRingHeader, dropped) == 32);
    assert!(offset_of!(FaultRingHeader, reserved) == 40);
};

impl FaultRingHeader {
    /// Byte offset of `producer`.
    pub const PRODUCER_OFFSET: usize = 16;
    /// Byte offset of `consumer`.
    pub const CONSUMER_OFFSET: usize = 24;
    /// Byte offset of `dropped`.
    pub const DROPPED_OFFSET: usize = 32;

    /// The header the hypervisor writes at registration.
    pub const fn new(capacity: u32) -> FaultRingHeader {
        FaultRingHeader {
            magic: FAULT_RING_MAGIC,
            version: FAULT_RING_VERSION,
            record_size: FAULT_RECORD_SIZE as u16,
            capacity,
            reserved0: 0,
            producer: 0,
            reserved1: 0,
            consumer: 0,
            reserved2: 0,
            dropped: 0,
            reserved: [0; 3],
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
        let n = self.producer.wrapping_sub(self.consumer);
        if n > self.capacity {
            None
        } else {
            Some(n)
        }
    }

    /// Decodes the little-endian bytes.
    pub fn from_bytes(b: &[u8; FAULT_RING_HEADER_SIZE]) -> FaultRingHeader {
        FaultRingHeader {
            magic: u32_at(b, 0),
            version: u16_at(b, 4),
            record_size: u16_at(b, 6),
            capacity: u32_at(b, 8),
            reserved0: u32_at(b, 12),
            producer: u32_at(b, 16),
            reserved1: u32_at(b, 20),
            consumer: u32_at(b, 24),
            reserved2: u32_at(b, 28),
            dropped: u64_at(b, 32),
            reserved: [u64_at(b, 40), u64_at(b, 48), u64_at(b, 56)],
        }
    }

    /// Encodes to little-endian bytes.
    pub fn to_bytes(&self) -> [u8; FAULT_RING_HEADER_SIZE] {
        let mut b = [0u8; FAULT_RING_HEADER_SIZE];
        put_u32(&mut b, 0, self.magic);
        put_u16(&mut b, 4, self.version);
        put_u16(&mut b, 6, self.record_size);
        put_u32(&mut b, 8, self.capacity);
        put_u32(&mut b, 12, self.reserved0);
        put_u32(&mut b, 16, self.producer);
        put_u32(&mut b, 20, self.reserved1);
        put_u32(&mut b, 24, self.consumer);
        put_u32(&mut b, 28, self.reserved2);
        put_u64(&mut b, 32, self.dropped);
        for (i, r) in self.reserved.iter().enumerate() {
            put_u64(&mut b, 40 + 8 * i, *r);
        }
        b
    }
}

/// The direction of a faulting DMA request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    /// The device tried to read memory.
    Read = 1,
    /// The device tried to write memory.
    Write = 2,
}

impl Direction {
    /// Decodes `direction`.
    pub const fn from_raw(raw: u8) -> Option<Direction> {
        match raw {
            1 => Some(Direction::Read),
            2 => Some(Direction::Write),
            _ => None,
        }
    }
}

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
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultRecord {
    /// Faulting IOVA (page).
    pub iova: u64,
    /// PCI requester id.
    pub source_id: u16,
    /// VT-d fault reason.
    pub reason: u8,
    /// [`Direction`] as a byte.
    pub direction: u8,
    /// 0.
    pub reserved0: u32,
    /// Fault sequence number.
    pub seq: u64,
    /// 0.
    pub reserved1: u64,
}

const _: () = {
    assert!(size_of::<FaultRecord>() == FAULT_RECORD_SIZE);
    assert!(offset_of!(FaultRecord, iova) == 0);
    assert!(offset_of!(FaultRecord, source_id) == 8);
    assert!(offset_of!(FaultRecord, reason) == 10);
    assert!(offset_of!(FaultRecord, direction) == 11);
    assert!(offset_of!(FaultRecord, reserved0) == 12);
    assert!(offset_of!(FaultRecord, seq) == 16);
    assert!(offset_of!(FaultRecord, reserved1) == 24);
};

impl FaultRecord {
    /// Decodes the little-endian bytes.
    pub fn from_bytes(b: &[u8; FAULT_RECORD_SIZE]) -> FaultRecord {
        FaultRecord {
            iova: u64_at(b, 0),
            source_id: u16_at(b, 8),
            reason: b[10],
            direction: b[11],
            reserved0: u32_at(b, 12),
            seq: u64_at(b, 16),
            reserved1: u64_at(b, 24),
        }
    }

    /// Encodes to little-endian bytes.
    pub fn to_bytes(&self) -> [u8; FAULT_RECORD_SIZE] {
        let mut b = [0u8; FAULT_RECORD_SIZE];
        put_u64(&mut b, 0, self.iova);
        put_u16(&mut b, 8, self.source_id);
        b[10] = self.reason;
        b[11] = self.direction;
        put_u32(&mut b, 12, self.reserved0);
        put_u64(&mut b, 16, self.seq);
        put_u64(&mut b, 24, self.reserved1);
        b
    }

    /// The direction; `None` for an unknown byte.
    pub const fn direction(&self) -> Option<Direction> {
        Direction::from_raw(self.direction)
    }
}
