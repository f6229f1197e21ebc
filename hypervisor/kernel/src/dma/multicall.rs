//! DMA_MULTICALL: the entries of the vCPU's batch area, each copied once, validated, run and
//! answered in place, under the policy's batch rules and the time budget.

use super::*;

impl VtdDma {
    pub(super) fn multicall(&self, vcpu: usize, a: &Args) -> Return {
        let (cursor, rsi) = (a.0[0], a.0[1]);
        // Refused before any entry ran: RDX is the cursor passed in, all 64 bits of it.
        let reject = |s: Status| Return::new(s, [cursor, 0, MulticallStop::Rejected as u64]);
        let Some((area, pages)) = *self.batch[vcpu % self.batch.len()].lock() else {
            return reject(Status::Noent);
        };
        if rsi != 0 {
            return reject(Status::Inval);
        }
        let calls = &self.calls[self.me(vcpu)];
        calls.multicalls.fetch_add(1, Ordering::Relaxed);
        let t0 = x86::rdtsc();
        // Copied once into the hypervisor's memory; only the copy is checked and used.
        let mut header = BatchHeader::new_zeroed();
        if let Err(s) = self.part.read(area, header.as_mut_bytes()) {
            return reject(s);
        }
        let capacity = wire::batch_capacity(pages, self.limits.max_batch);
        let info = match wire::validate_batch(&header, cursor, capacity, &self.limits) {
            Ok(i) => i,
            Err(s) => return reject(s),
        };
        // Copy-and-validate cycles of the call, added to the vCPU's counter once at its end.
        let mut validate = x86::rdtsc() - t0;
        // The budget; a deferred guest's MULTICALL also keeps within the deferred slack, so
        // the other vCPUs' timer checks are never held off longer than that (the call
        // checks the bound itself on every entry as well).
        let budget = if self.policy == Policy::Deferred {
            MULTICALL_BUDGET_US.min(self.svc.slack_ns / 1000 / 2)
        } else {
            MULTICALL_BUDGET_US
        };
        let deadline = tsc::deadline_us(budget);
        // The caller's shard, held for the batch but for the cross-vCPU path of an UNMAP of
        // another vCPU's mapping (see `GuestDma::run`).
        let me = self.me(vcpu);
        let mut shard = self.shards[me].lock();
        shard.st.begin_batch();
        let mut i = info.cursor;
        let mut stop = MulticallStop::Done;
        let mut result = Status::Ok;
        while i < info.count {
            if i > info.cursor && tsc::expired(deadline) {
                stop = MulticallStop::Preempted;
                result = Status::Again;
                break;
            }
            let at = area + Entry::offset_of_index(i) as u64;
            let t0 = x86::rdtsc();
            let mut e = Entry::new_zeroed();
            // Copied once; only the copy is checked and used.
            let outcome = match self.part.read(at, e.as_mut_bytes()) {
                Err(s) => Err(s),
                Ok(()) => {
                    let v = wire::validate_entry(&e, &self.limits);
                    validate += x86::rdtsc() - t0;
                    match v {
                        Ok(req) => match self.run_on(&mut shard, req, false) {
                            Some(r) => r,
                            None => {
                                let (held, r) = self.adopt_and_run(me, shard, req, false);
                                shard = held;
                                r
                            }
                        },
                        Err(s) => {
                            shard.st.note_error();
                            Err(s)
                        }
                    }
                }
            };
            // Only the output fields are written back (status and done, and a MAP's iova):
            // never the inputs, which the guest may have changed meanwhile.
            let (o, ok) = match outcome {
                Ok(o) => (o, true),
                Err(s) => {
                    let is_map = e.op == wire::Op::Map as u16;
                    let o = EntryOutcome {
                        status: s,
                        done: 0,
                        iova: is_map.then_some(0),
                    };
                    (o, false)
                }
            };
            let _ = self
                .part
                .write(at + Entry::STATUS_OFFSET as u64, &o.status_done_bytes());
            if let Some(iova) = o.iova {
                let _ = self
                    .part
                    .write(at + Entry::IOVA_OFFSET as u64, &iova.to_le_bytes());
            }
            if !ok {
                stop = MulticallStop::EntryFailed;
                result = o.status;
                break;
            }
            i += 1;
        }
        let unsynced = self
            .on(&mut shard, |st, dom, ivs| st.end_batch(dom, ivs, &Tsc))
            .is_err();
        self.publish_deadline(me, &shard.st);
        drop(shard);
        calls.cycles_validate.fetch_add(validate, Ordering::Relaxed);
        MulticallReturn {
            status: result,
            cursor: i,
            completed: i - info.cursor,
            stop,
            unsynced,
        }
        .to_return()
    }
}
