//! `nvme-pattern`: every vCPU writes a pattern through its own queue pair (single commands of
//! 1, 2, 3, 16 and 10 pages, a burst of 32 commands, a burst of 64 KiB commands), clears its
//! buffers, reads the region back in another layout and compares every byte; then writes a
//! second region and reads both back through pipelined cycles (buffers mapped one cycle
//! ahead, as the benchmark runs).

use moat_nvme::{Done, IoQueue, Mapper, Native, Request, Staged};

use super::{bytes, data, setup, Worker, OUTS};
use crate::abi::BootInfo;
use crate::{println, Outcome};

/// Bytes of disk (and of the vCPU's data area) the pattern covers.
const SPAN: u64 = 768 << 10;
/// Disk bytes per vCPU.
const DISK_PER_VCPU: u64 = 2 << 20;

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The pattern byte at disk offset `off` for vCPU `v` (different for every block and vCPU).
fn pattern_at(v: usize, off: u64) -> u8 {
    (mix(((v as u64) << 48) | (off / 8)) >> (8 * (off % 8))) as u8
}

fn fill(v: usize, gpa: u64, disk: u64, len: u64) {
    for (i, b) in bytes(gpa, len).iter_mut().enumerate() {
        *b = pattern_at(v, disk + i as u64);
    }
}

/// Waits until `want` commands completed, all OK.
pub(crate) fn complete(
    p: &mut Native,
    m: &mut Mapper<moat_pvdma::Native>,
    q: &mut IoQueue,
    want: usize,
) -> Outcome {
    let mut got = 0;
    let mut bad = None;
    while got < want {
        let r = q.wait(p, m, &mut |d: Done| {
            if let Err(e) = d.result {
                bad.get_or_insert((d.tag, e));
            }
        });
        match r {
            Ok(n) => got += n,
            Err(e) => {
                println!("nvme: waiting for completions: {e}");
                return Err("an NVMe command did not complete");
            }
        }
    }
    if let Some((tag, e)) = bad {
        println!("nvme: command {tag} failed: {e}");
        return Err("an NVMe command failed");
    }
    Ok(())
}

/// The per-vCPU job: `out` = [bytes compared, bytes wrong].
pub(crate) fn job(w: Worker<'_>, _arg: u64, out: &mut [u64; OUTS]) -> Outcome {
    let Worker { v, p, m, q } = w;
    let bs = u64::from(q.namespace().block_size);
    let disk0 = v as u64 * DISK_PER_VCPU;
    let mem0 = data(v);
    if (disk0 + DISK_PER_VCPU) / bs > q.namespace().blocks {
        return Err("namespace too small for the pattern");
    }
    fill(v, mem0, disk0, SPAN);
    let req = |write: bool, off: u64, len: u64, tag: u64| Request {
        write,
        lba: (disk0 + off) / bs,
        gpa: mem0 + off,
        len,
        tag,
    };
    let submit =
        |p: &mut Native, m: &mut Mapper<moat_pvdma::Native>, q: &mut IoQueue, reqs: &[Request]| {
            q.submit(p, m, reqs).map_err(|e| {
                println!("nvme: vcpu {v}: submit failed: {e}");
                "NVMe submit failed"
            })
        };
    // Single commands: 1 page (PRP1), 2 pages (PRP2), 3, 16 and 10 pages (PRP list), which
    // cover [0, 128 KiB).
    let mut off = 0;
    for (k, pages) in [1u64, 2, 3, 16, 10].into_iter().enumerate() {
        submit(p, m, q, &[req(true, off, pages * 4096, k as u64)])?;
        complete(p, m, q, 1)?;
        off += pages * 4096;
    }
    // A burst of 32 commands of 4 KiB, then 8 of 64 KiB, each burst submitted at once.
    let mut reqs = [req(true, 0, 4096, 0); 32];
    off = 128 << 10;
    for (k, r) in reqs.iter_mut().enumerate() {
        *r = req(true, off + k as u64 * 4096, 4096, 100 + k as u64);
    }
    submit(p, m, q, &reqs)?;
    complete(p, m, q, 32)?;
    off = 256 << 10;
    for (k, r) in reqs.iter_mut().take(8).enumerate() {
        *r = req(true, off + k as u64 * 65536, 65536, 200 + k as u64);
    }
    submit(p, m, q, &reqs[..8])?;
    complete(p, m, q, 8)?;
    // Clear the buffers, read everything back as 12 commands of 64 KiB in one burst.
    bytes(mem0, SPAN).fill(0);
    for (k, r) in reqs.iter_mut().take(12).enumerate() {
        *r = req(false, k as u64 * 65536, 65536, 300 + k as u64);
    }
    submit(p, m, q, &reqs[..12])?;
    complete(p, m, q, 12)?;
    let wrong = bytes(mem0, SPAN)
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b != pattern_at(v, disk0 + i as u64))
        .count() as u64;
    out[0] = SPAN;
    out[1] = wrong;
    if let Some(i) = bytes(mem0, SPAN)
        .iter()
        .enumerate()
        .position(|(i, &b)| b != pattern_at(v, disk0 + i as u64))
    {
        let zeros = bytes(mem0, SPAN).iter().filter(|&&b| b == 0).count();
        println!(
            "nvme-pattern: vcpu {v}: first difference at byte {i:#x}: {:#04x}, want {:#04x}; {zeros} zero byte(s)",
            bytes(mem0, SPAN)[i],
            pattern_at(v, disk0 + i as u64)
        );
    }
    if wrong != 0 {
        return Err("the data read back differs from what was written");
    }
    Ok(())
}

/// Runs `reqs` in order through pipelined cycles ([`IoQueue::wait_pipelined`]: at most
/// `depth` outstanding and as many mapped ahead; each cycle waits for `min` completions).
/// Returns (cycles, most requests staged at once); fails on any error or failed command.
fn pipelined(
    p: &mut Native,
    m: &mut Mapper<moat_pvdma::Native>,
    q: &mut IoQueue,
    reqs: &[Request],
    depth: usize,
    min: usize,
) -> Result<(u64, usize), &'static str> {
    let (mut next, mut completed, mut cycles, mut most) = (0, 0, 0u64, 0);
    let mut bad = None;
    let mut staged = Staged::empty();
    while completed < reqs.len() {
        let mut refill = |_: &[u64], out: &mut [Request]| {
            let k = out.len().min(reqs.len() - next);
            out[..k].copy_from_slice(&reqs[next..next + k]);
            next += k;
            k
        };
        let r = q.wait_pipelined(
            p,
            m,
            &mut staged,
            depth,
            (min, depth),
            &mut refill,
            &mut |d: Done| {
                completed += 1;
                if let Err(e) = d.result {
                    bad.get_or_insert((d.tag, e));
                }
            },
        );
        if let Err(e) = r {
            println!("nvme: pipelined cycle: {e}");
            return Err("a pipelined NVMe cycle failed");
        }
        cycles += 1;
        most = most.max(staged.len());
    }
    if !staged.is_empty() {
        let _ = IoQueue::unstage(m, &mut staged);
        return Err("pipelined cycles: requests were left staged");
    }
    if let Some((tag, e)) = bad {
        println!("nvme: pipelined command {tag} failed: {e}");
        return Err("an NVMe command failed");
    }
    Ok((cycles, most))
}

/// The pipelined job, after [`job`] wrote the pattern to the first [`SPAN`] of the vCPU's
/// disk area: writes the second `SPAN` (48 writes of 16 KiB, depth 8, waiting for 2 per
/// cycle), clears both, reads both back (96 reads of 16 KiB, depth 32, waiting for 16) and
/// compares every byte. `out` = [bytes compared, bytes wrong, -, -, cycles, most staged].
pub(crate) fn pipelined_job(w: Worker<'_>, _arg: u64, out: &mut [u64; OUTS]) -> Outcome {
    let Worker { v, p, m, q } = w;
    let bs = u64::from(q.namespace().block_size);
    let disk0 = v as u64 * DISK_PER_VCPU;
    let mem0 = data(v);
    const CHUNK: u64 = 16 << 10;
    let req = |write: bool, off: u64, tag: u64| Request {
        write,
        lba: (disk0 + off) / bs,
        gpa: mem0 + off,
        len: CHUNK,
        tag,
    };
    fill(v, mem0 + SPAN, disk0 + SPAN, SPAN);
    let mut reqs = [req(true, 0, 0); (2 * SPAN / CHUNK) as usize];
    let writes = (SPAN / CHUNK) as usize;
    for (k, r) in reqs.iter_mut().take(writes).enumerate() {
        *r = req(true, SPAN + k as u64 * CHUNK, k as u64);
    }
    let (c1, s1) = pipelined(p, m, q, &reqs[..writes], 8, 2)?;
    bytes(mem0, 2 * SPAN).fill(0);
    for (k, r) in reqs.iter_mut().enumerate() {
        *r = req(false, k as u64 * CHUNK, 1000 + k as u64);
    }
    let (c2, s2) = pipelined(p, m, q, &reqs, 32, 16)?;
    let wrong = bytes(mem0, 2 * SPAN)
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b != pattern_at(v, disk0 + i as u64))
        .count() as u64;
    out[0] = 2 * SPAN;
    out[1] = wrong;
    out[4] = c1 + c2;
    out[5] = s1.max(s2) as u64;
    if wrong != 0 || q.outstanding() != 0 {
        return Err("pipelined cycles: data differs or requests were left over");
    }
    Ok(())
}

/// `nvme-pattern`: the pattern job on every vCPU, then teardown and the leak check.
pub fn pattern(info: &BootInfo) -> Outcome {
    let mut s = setup(info)?;
    let policy = crate::dma::policy_name(s.m.pvdma().info().policy);
    let before = s.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
    let r = s.run(info, 1, 0);
    let after = s.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
    let piped = match &r {
        Ok(_) => Some(s.run(info, 3, 0)),
        Err(_) => None,
    };
    let piped_after = s.m.pvdma().stats(false).map_err(|_| "STATS failed")?;
    let td = s.teardown();
    let (outs, _) = r?;
    let (mut map_calls, mut unmap_calls) = (0, 0);
    for (v, o) in outs.iter().enumerate().take(s.vcpus) {
        println!(
            "nvme-pattern: policy {policy} vcpu {v} of {}: wrote 45 commands (1, 2, 3, 16, 10 pages; bursts of 32 and 8), read back {} KiB in one burst of 12: {} byte(s) differ; {} map and {} unmap hypercall(s)",
            s.vcpus,
            o[0] >> 10,
            o[1],
            o[2],
            o[3]
        );
        map_calls += o[2];
        unmap_calls += o[3];
    }
    println!(
        "nvme-pattern: policy {policy}: {} maps, {} unmaps, {} invalidations, {} waits, {} exits during the I/O (hypervisor counters); the driver made {map_calls} map and {unmap_calls} unmap hypercall(s)",
        after.maps.get() - before.maps.get(),
        after.unmaps.get() - before.unmaps.get(),
        after.invalidations.get() - before.invalidations.get(),
        after.waits.get() - before.waits.get(),
        after.exits.get() - before.exits.get()
    );
    let (outs, _) = piped.ok_or("no pipelined run")??;
    let n = s.vcpus;
    outs.iter().take(n).enumerate().for_each(|(v, o)| println!(
        "nvme-pipeline: policy {policy} vcpu {v} of {n}: wrote 768 KiB (48 writes, depth 8) and read back {} KiB (96 reads, depth 32) in {} pipelined cycles, at most {} request(s) mapped ahead: {} byte(s) differ",
        o[0] >> 10, o[4], o[5], o[1]
    ));
    println!(
        "nvme-pipeline: policy {policy}: {} maps, {} unmaps, {} invalidation waits during the pipelined I/O (hypervisor counters)",
        piped_after.maps.get() - after.maps.get(),
        piped_after.unmaps.get() - after.unmaps.get(),
        piped_after.waits.get() - after.waits.get()
    );
    td
}
