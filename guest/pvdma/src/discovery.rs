//! Discovery: CPUID leaves, then `DMA_QUERY`.

use crate::driver::GuestBuffer;
use crate::{Error, Hypervisor};
use moat_abi::dma::{
    Features, Limits, Policy, QueryHeader, ReservedRegion, QUERY_HEADER_SIZE, REGION_SIZE,
};
use moat_abi::{
    is_moat_signature, Args, Call, FromZeros, Instruction, IntoBytes, ABI_VERSION_DMA,
    CPUID_FEATURES_LEAF, CPUID_SIGNATURE_LEAF,
};

/// Reserved regions the driver keeps (the rest are counted in
/// [`Discovery::regions_total`]).
pub const MAX_REGIONS: usize = 16;

/// What discovery found: the hypervisor's DMA interface parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discovery {
    /// ABI version (CPUID and QUERY agree).
    pub abi_version: u32,
    /// Call bitmap from CPUID.
    pub calls: u32,
    /// Hypercall instruction from CPUID.
    pub instruction: Instruction,
    /// Protection policy in force.
    pub policy: Policy,
    /// Feature bits.
    pub features: Features,
    /// IOMMU page sizes used (bit n: 2^n bytes).
    pub page_sizes: u64,
    /// Validation limits (IOVA width, max batch, max pages per mapping).
    pub limits: Limits,
    /// Quota of live mappings.
    pub max_mappings: u32,
    /// Quota of page-table pages.
    pub max_pt_pages: u32,
    /// Deferred policy: queue bound in unmaps.
    pub deferred_max_entries: u32,
    /// Deferred policy: queue bound in microseconds.
    pub deferred_max_us: u32,
    /// Most pages of a batch area.
    pub max_batch_pages: u32,
    /// Reserved regions the hypervisor reported in total.
    pub regions_total: u32,
    regions: [ReservedRegion; MAX_REGIONS],
    nr_regions: usize,
}

impl Discovery {
    /// The reserved regions kept (at most [`MAX_REGIONS`]; fewer than
    /// [`Discovery::regions_total`] if the scratch buffer or the driver's table was too
    /// small).
    pub fn regions(&self) -> &[ReservedRegion] {
        &self.regions[..self.nr_regions]
    }

    /// Whether a call is in the CPUID call bitmap.
    pub const fn has_call(&self, call: Call) -> bool {
        self.calls & call.bit() != 0
    }
}

/// Finds the Moat DMA interface: checks the CPUID signature, the ABI version and the call
/// bitmap, then issues `DMA_QUERY` into `scratch` (at least [`QUERY_HEADER_SIZE`] bytes of
/// guest memory the driver may overwrite) and checks the response.
pub fn discover<H: Hypervisor>(hv: &mut H, scratch: GuestBuffer) -> Result<Discovery, Error> {
    let [max_leaf, b, c, d] = hv.cpuid(CPUID_SIGNATURE_LEAF);
    if !is_moat_signature(b, c, d) || max_leaf < CPUID_FEATURES_LEAF {
        return Err(Error::NotMoat);
    }
    let [version, calls, insn, _] = hv.cpuid(CPUID_FEATURES_LEAF);
    if version < ABI_VERSION_DMA {
        return Err(Error::OldAbi { version });
    }
    let instruction = Instruction::from_raw(insn).ok_or(Error::Protocol)?;
    if Call::DMA_REQUIRED.iter().any(|c| calls & c.bit() == 0) {
        return Err(Error::NoDma);
    }
    if scratch.len < QUERY_HEADER_SIZE as u64 {
        return Err(Error::BufferTooSmall);
    }
    let ret = hv.hypercall(Call::DmaQuery, Args([scratch.gpa, scratch.len, 0, 0, 0, 0]));
    Error::check_raw(ret.rax as i64)?;
    let mut h = QueryHeader::new_zeroed();
    hv.read(scratch.gpa, h.as_mut_bytes());
    let policy = h.policy().ok_or(Error::Protocol)?;
    // Regions start at `header_size` (64 in this version; later versions may grow it).
    let hsize = u64::from(h.header_size.get());
    let fit = scratch.len.saturating_sub(hsize) / REGION_SIZE as u64;
    let (written, total) = (h.regions_written.get(), h.nr_regions.get());
    if h.abi_version.get() != version
        || hsize < QUERY_HEADER_SIZE as u64
        || hsize > scratch.len
        || !(12..=64).contains(&h.iova_width)
        || h.max_batch.get() == 0
        || h.page_sizes.get() & (1 << 12) == 0
        || written > total
        || u64::from(written) > fit
        || ret.values[0] != hsize + u64::from(total) * REGION_SIZE as u64
    {
        return Err(Error::Protocol);
    }
    let mut regions = [ReservedRegion::default(); MAX_REGIONS];
    let keep = (written as usize).min(MAX_REGIONS);
    for (i, r) in regions.iter_mut().take(keep).enumerate() {
        hv.read(
            scratch.gpa + hsize + (i * REGION_SIZE) as u64,
            r.as_mut_bytes(),
        );
    }
    Ok(Discovery {
        abi_version: version,
        calls,
        instruction,
        policy,
        features: h.features(),
        page_sizes: h.page_sizes.get(),
        limits: h.limits(),
        max_mappings: h.max_mappings.get(),
        max_pt_pages: h.max_pt_pages.get(),
        deferred_max_entries: h.deferred_max_entries.get(),
        deferred_max_us: h.deferred_max_us.get(),
        max_batch_pages: h.max_batch_pages.get(),
        regions_total: total,
        regions,
        nr_regions: keep,
    })
}
