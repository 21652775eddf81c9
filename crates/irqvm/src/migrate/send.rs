//! The source side (`PUT /api/v1/vm.send-migration`, on the API's unfiltered `api-files`
//! thread): connect, turn on KVM's dirty page log, copy all of RAM that is not zero while the
//! guest runs, then copy what the guest dirtied, round after round, until a round finds at most
//! [`FINAL_PAGES`] pages (or after [`MAX_ROUNDS`]); then pause and capture the state as a
//! snapshot does, copy the last dirty pages and the state, and wait for the target's answer.
//!
//! The outcome decides the source VM's fate: the target runs it, so the source ends (status
//! 0); the target refused it (its checks, nothing of it ran), so the source resumes; the stream
//! broke before the whole VM was sent, so the source resumes; the answer was lost after it was
//! sent, so the source stays paused, since the target may be running the guest and two copies
//! must never run.

use std::io::{BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::wire;
use super::MigrateError;
use crate::api::VmHandle;
use crate::memory::{self, GuestRam, PAGE_SIZE};

/// Stop-and-copy once a round finds at most this many dirty pages (1 MiB).
pub const FINAL_PAGES: u64 = 256;
/// Most copy rounds after the first full copy: a guest that dirties pages faster than they are
/// copied is stopped after these, with what it dirtied in the last.
pub const MAX_ROUNDS: usize = 8;

/// How long the source waits for the target to build and start the VM it sent.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// One copy round while the guest ran.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub pages: u64,
    pub ms: f64,
}

/// What a migration did and how long it took (`vm.send-migration`'s answer).
#[derive(Clone, Debug, Serialize)]
pub struct MigrationReport {
    /// The rounds while the guest ran: the first is the full copy (pages that are not zero).
    pub rounds: Vec<Round>,
    /// The pages copied with the VM paused.
    pub final_pages: u64,
    /// From the pause request to every vCPU's state captured (ms).
    pub pause_ms: f64,
    /// From the pause request to the target's answer that its VM runs (ms): the downtime, as
    /// the source sees it (the target resumed the guest just before it answered).
    pub downtime_ms: f64,
    /// From the request to the answer (ms).
    pub total_ms: f64,
    /// The target's own report: its restore time (JSON text).
    pub target: serde_json::Value,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Migrates the VM behind `handle` to the irqvm listening on `socket`
/// (`irqvm restore --incoming`), stopping the guest once a round finds at most `final_pages`
/// dirty pages. On success the source VM has ended; on failure it runs again
/// (or, if it was paused before, stays paused), except for [`MigrateError::AnswerLost`].
pub fn send(
    handle: &VmHandle,
    socket: &Path,
    final_pages: u64,
) -> Result<MigrationReport, MigrateError> {
    let start = Instant::now();
    if handle.control.stop_requested() {
        return Err(MigrateError::NotReady("the VM has stopped".into()));
    }
    let stream = UnixStream::connect(socket).map_err(|source| MigrateError::Socket {
        path: socket.to_path_buf(),
        source,
    })?;
    let mut w = BufWriter::with_capacity(1 << 20, stream.try_clone()?);
    let source = &handle.snapshot;
    wire::write_hello(&mut w, memory::ram_size(&source.memory))?;
    memory::set_dirty_logging(&source.vm_fd, &source.memory, true)?;
    let was_paused = handle.control.pause_requested();
    let outcome = copy_all(handle, &mut w, start, final_pages);
    let outcome = match outcome {
        Ok(sent) => answer(&stream, sent, start),
        Err(e) => {
            let _ = wire::write_abort(&mut w, &e.to_string()).and_then(|()| w.flush());
            Err(e)
        }
    };
    match &outcome {
        Ok(_) => {
            tracing::info!("the VM migrated: ending the source");
            let _ = crate::api::router::Control::shutdown(handle);
        }
        Err(MigrateError::AnswerLost(_)) => {}
        Err(_) => {
            let _ = memory::set_dirty_logging(&source.vm_fd, &source.memory, false);
            if !was_paused && handle.control.pause_requested() {
                handle.control.resume();
            }
        }
    }
    outcome
}

/// What was sent, before the answer.
struct Sent {
    rounds: Vec<Round>,
    final_pages: u64,
    paused_at: Instant,
    pause_ms: f64,
}

/// The rounds, the pause, the last pages and the state.
fn copy_all(
    handle: &VmHandle,
    w: &mut BufWriter<UnixStream>,
    start: Instant,
    final_threshold: u64,
) -> Result<Sent, MigrateError> {
    let source = &handle.snapshot;
    let (mem, vm) = (&source.memory, &source.vm_fd);
    let mut buf = wire::buffer();
    let mut rounds = vec![Round {
        pages: send_nonzero(w, mem, &mut buf)?,
        ms: ms(start.elapsed()),
    }];
    let pending = loop {
        let t = Instant::now();
        let dirty = memory::take_dirty_pages(vm, mem)?;
        let pages: u64 = dirty.iter().map(|r| r.1).sum();
        if pages <= final_threshold || rounds.len() > MAX_ROUNDS {
            break dirty;
        }
        for run in &dirty {
            wire::send_run(w, mem, *run, &mut buf)?;
        }
        rounds.push(Round {
            pages,
            ms: ms(t.elapsed()),
        });
    };
    w.flush()?;
    let paused_at = Instant::now();
    // After the capture no vCPU runs guest code (a vCPU completing an I/O string step at its
    // safe point writes RAM: that happens inside it), so the log read next is the last.
    let (state, _) = crate::snapshot::take::capture(handle)?;
    let pause_ms = ms(paused_at.elapsed());
    let last = memory::take_dirty_pages(vm, mem)?;
    let mut final_pages = 0;
    for run in merge(&pending, &last) {
        final_pages += wire::send_run(w, mem, run, &mut buf)?;
    }
    let text = serde_json::to_vec(&state)
        .map_err(|e| MigrateError::Protocol(format!("cannot encode the state: {e}")))?;
    wire::write_state(w, &text)?;
    w.flush()?;
    Ok(Sent {
        rounds,
        final_pages,
        paused_at,
        pause_ms,
    })
}

/// Waits (up to [`ANSWER_TIMEOUT`]) for the target's answer to a VM sent whole.
fn answer(
    stream: &UnixStream,
    sent: Sent,
    start: Instant,
) -> Result<MigrationReport, MigrateError> {
    let mut r = stream;
    let answered = stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(MigrateError::from)
        .and_then(|()| wire::read_answer(&mut r));
    match answered {
        Ok(Ok(text)) => Ok(MigrationReport {
            rounds: sent.rounds,
            final_pages: sent.final_pages,
            pause_ms: sent.pause_ms,
            downtime_ms: ms(sent.paused_at.elapsed()),
            total_ms: ms(start.elapsed()),
            target: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        }),
        Ok(Err(why)) => Err(MigrateError::Refused(why)),
        Err(e) => Err(MigrateError::AnswerLost(e.to_string())),
    }
}

/// The first round: every page of RAM that is not all zero (the target's RAM starts zeroed, as
/// a fresh anonymous mapping is), read in [`wire::MAX_RUN`]-page chunks. Returns the pages sent.
fn send_nonzero(w: &mut impl Write, mem: &GuestRam, buf: &mut [u8]) -> Result<u64, MigrateError> {
    let page = PAGE_SIZE as usize;
    let mut sent = 0;
    for region in mem.iter() {
        let (base, len) = (region.start_addr().0, region.len());
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(wire::MAX_RUN * PAGE_SIZE) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(base + at))
                .map_err(|e| MigrateError::Protocol(format!("cannot read guest RAM: {e}")))?;
            let mut first = 0;
            while first < n {
                if is_zero(&chunk[first..first + page]) {
                    first += page;
                    continue;
                }
                let mut end = first + page;
                while end < n && !is_zero(&chunk[end..end + page]) {
                    end += page;
                }
                wire::write_pages(w, base + at + first as u64, &chunk[first..end])?;
                sent += ((end - first) / page) as u64;
                first = end;
            }
            at += n as u64;
        }
    }
    Ok(sent)
}

/// A page of zeros: comparing with it is a `memcmp`, fast in a debug build too.
static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

fn is_zero(page: &[u8]) -> bool {
    page == &ZERO_PAGE[..]
}

/// The union of two sorted lists of runs, as sorted runs without overlap.
fn merge(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, pages) in all {
        let end = start + pages * PAGE_SIZE;
        match out.last_mut() {
            Some((s, p)) if *s + *p * PAGE_SIZE >= start => {
                let last_end = (*s + *p * PAGE_SIZE).max(end);
                *p = (last_end - *s) / PAGE_SIZE;
            }
            _ => out.push((start, pages)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_without_overlap() {
        let p = PAGE_SIZE;
        let a = [(0, 2), (10 * p, 1)];
        let b = [(p, 3), (20 * p, 1), (11 * p, 1)];
        assert_eq!(merge(&a, &b), vec![(0, 4), (10 * p, 2), (20 * p, 1)]);
        assert_eq!(merge(&[], &[]), vec![]);
    }

    /// The first round sends exactly the pages that are not zero, as runs.
    #[test]
    fn the_first_round_skips_zero_pages() {
        let mem = memory::create_guest_memory(4 << 20).unwrap();
        for gpa in [0x1000u64, 0x2000, 0x5000, (4 << 20) - 8] {
            mem.write_slice(&[1u8], GuestAddress(gpa)).unwrap();
        }
        let mut stream = Vec::new();
        let sent = send_nonzero(&mut stream, &mem, &mut wire::buffer()).unwrap();
        assert_eq!(sent, 4);
        let target = memory::create_guest_memory(4 << 20).unwrap();
        let mut r = stream.as_slice();
        let mut buf = wire::buffer();
        let mut records = 0;
        while !r.is_empty() {
            wire::read_record(&mut r, &target, &mut buf).unwrap();
            records += 1;
        }
        assert_eq!(records, 3, "pages 1-2, 5, the last");
        let mut a = vec![0u8; 4 << 20];
        let mut b = vec![0u8; 4 << 20];
        mem.read_slice(&mut a, GuestAddress(0)).unwrap();
        target.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b);
    }
}
