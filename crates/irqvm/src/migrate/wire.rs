//! The migration stream, source to target (all integers little-endian):
//!
//! | record | bytes |
//! |---|---|
//! | hello | `IRQVMMIG`, format [`VERSION`] (u32), guest RAM size (u64) |
//! | pages | tag 1, guest-physical address (u64, page-aligned), page count (u32, 1 to [`MAX_RUN`]), the pages |
//! | state | tag 2, length (u64, at most [`MAX_STATE`]), `state.json`'s text (the snapshot format) |
//! | abort | tag 3, length (u32, at most [`MAX_MESSAGE`]), why, in UTF-8 |
//!
//! Pages come in any order and a page may come again (a later copy wins); the state ends the
//! stream. Then the target answers on the same socket: status (u8: 0 running, 1 refused),
//! length (u32, at most [`MAX_MESSAGE`]), a message (the target's timings, or why it refused).
//! The target reads the source as it reads a snapshot file: every length and address is checked
//! before it is used.

use std::io::{Read, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::MigrateError;
use crate::memory::{GuestRam, PAGE_SIZE};

/// The stream's magic.
pub const MAGIC: [u8; 8] = *b"IRQVMMIG";
/// The stream format this build writes and reads.
pub const VERSION: u32 = 1;
/// Most pages in one record: 1 MiB, the copy buffer's size.
pub const MAX_RUN: u64 = 256;
/// Largest state text accepted (1024 vCPUs fit in a few tens of MiB).
pub const MAX_STATE: u64 = 256 << 20;
/// Largest abort or answer message accepted.
pub const MAX_MESSAGE: u32 = 64 << 10;

const TAG_PAGES: u8 = 1;
const TAG_STATE: u8 = 2;
const TAG_ABORT: u8 = 3;

/// The copy buffer both sides use: [`MAX_RUN`] pages.
pub fn buffer() -> Vec<u8> {
    vec![0; (MAX_RUN * PAGE_SIZE) as usize]
}

fn protocol(what: impl Into<String>) -> MigrateError {
    MigrateError::Protocol(what.into())
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub fn write_hello(w: &mut impl Write, memory_size: u64) -> std::io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&VERSION.to_le_bytes())?;
    w.write_all(&memory_size.to_le_bytes())
}

/// The hello's guest RAM size, after the magic and version are checked (the size itself is
/// checked by `memory::create_guest_memory`).
pub fn read_hello(r: &mut impl Read) -> Result<u64, MigrateError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)?;
    if magic != MAGIC {
        return Err(protocol("not an irqvm migration stream (bad magic)"));
    }
    let version = read_u32(r)?;
    if version != VERSION {
        return Err(protocol(format!(
            "stream format version {version} is not supported (this irqvm reads {VERSION})"
        )));
    }
    Ok(read_u64(r)?)
}

/// One record of `data.len() / PAGE_SIZE` pages (at most [`MAX_RUN`]) starting at `gpa`.
pub fn write_pages(w: &mut impl Write, gpa: u64, data: &[u8]) -> std::io::Result<()> {
    let count = data.len() as u64 / PAGE_SIZE;
    debug_assert!(count > 0 && count <= MAX_RUN && data.len() as u64 % PAGE_SIZE == 0);
    w.write_all(&[TAG_PAGES])?;
    w.write_all(&gpa.to_le_bytes())?;
    w.write_all(&(count as u32).to_le_bytes())?;
    w.write_all(data)
}

/// Records for the run of `pages` pages at `gpa`, read from `mem` now (`buf`: [`buffer`]).
/// Returns the pages sent.
pub fn send_run(
    w: &mut impl Write,
    mem: &GuestRam,
    (gpa, pages): (u64, u64),
    buf: &mut [u8],
) -> Result<u64, MigrateError> {
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(MAX_RUN);
        let at = gpa + done * PAGE_SIZE;
        let chunk = &mut buf[..(n * PAGE_SIZE) as usize];
        mem.read_slice(chunk, GuestAddress(at))
            .map_err(|e| protocol(format!("cannot read guest RAM at {at:#x}: {e}")))?;
        write_pages(w, at, chunk)?;
        done += n;
    }
    Ok(pages)
}

pub fn write_state(w: &mut impl Write, text: &[u8]) -> std::io::Result<()> {
    w.write_all(&[TAG_STATE])?;
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text)
}

pub fn write_abort(w: &mut impl Write, why: &str) -> std::io::Result<()> {
    let why = truncated(why);
    w.write_all(&[TAG_ABORT])?;
    w.write_all(&(why.len() as u32).to_le_bytes())?;
    w.write_all(why.as_bytes())
}

fn truncated(text: &str) -> &str {
    let mut end = text.len().min(MAX_MESSAGE as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What the target reads after the hello, record by record.
#[derive(Debug)]
pub enum Record {
    /// Pages, already written into guest RAM.
    Pages(u64),
    /// The state text; the stream is over.
    State(Vec<u8>),
    /// The source gave up.
    Abort(String),
}

/// Reads one record; a pages record goes straight into `mem` (its range checked first).
pub fn read_record(
    r: &mut impl Read,
    mem: &GuestRam,
    buf: &mut [u8],
) -> Result<Record, MigrateError> {
    match read_u8(r)? {
        TAG_PAGES => {
            let gpa = read_u64(r)?;
            let count = u64::from(read_u32(r)?);
            if count == 0 || count > MAX_RUN || gpa % PAGE_SIZE != 0 {
                return Err(protocol(format!(
                    "a page record of {count} pages at {gpa:#x} (at most {MAX_RUN}, page-aligned)"
                )));
            }
            let len = count * PAGE_SIZE;
            let inside = gpa.checked_add(len).is_some_and(|_| {
                mem.check_range(
                    GuestAddress(gpa),
                    len as usize,
                    vm_memory::Permissions::ReadWrite,
                )
            });
            if !inside {
                return Err(protocol(format!(
                    "{count} pages at {gpa:#x} are not all guest RAM"
                )));
            }
            let chunk = &mut buf[..len as usize];
            r.read_exact(chunk)?;
            mem.write_slice(chunk, GuestAddress(gpa))
                .map_err(|e| protocol(format!("cannot write guest RAM at {gpa:#x}: {e}")))?;
            Ok(Record::Pages(count))
        }
        TAG_STATE => {
            let len = read_u64(r)?;
            if len > MAX_STATE {
                return Err(protocol(format!(
                    "a state of {len} bytes (at most {MAX_STATE})"
                )));
            }
            let mut text = vec![0u8; len as usize];
            r.read_exact(&mut text)?;
            Ok(Record::State(text))
        }
        TAG_ABORT => Ok(Record::Abort(read_message(r)?)),
        tag => Err(protocol(format!("unknown record tag {tag}"))),
    }
}

fn read_message(r: &mut impl Read) -> Result<String, MigrateError> {
    let len = read_u32(r)?;
    if len > MAX_MESSAGE {
        return Err(protocol(format!(
            "a message of {len} bytes (at most {MAX_MESSAGE})"
        )));
    }
    let mut text = vec![0u8; len as usize];
    r.read_exact(&mut text)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// The target's answer: `Ok(timings)` once its VM runs, `Err(why)` if it refused the VM.
pub fn write_answer(w: &mut impl Write, answer: Result<&str, &str>) -> std::io::Result<()> {
    let (status, text) = match answer {
        Ok(text) => (0u8, text),
        Err(text) => (1u8, text),
    };
    let text = truncated(text);
    w.write_all(&[status])?;
    w.write_all(&(text.len() as u32).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    w.flush()
}

/// Reads the target's answer: the outer error is a broken stream, the inner the answer.
pub fn read_answer(r: &mut impl Read) -> Result<Result<String, String>, MigrateError> {
    let status = read_u8(r)?;
    let text = read_message(r)?;
    match status {
        0 => Ok(Ok(text)),
        1 => Ok(Err(text)),
        other => Err(protocol(format!("unknown answer status {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram() -> GuestRam {
        crate::memory::create_guest_memory(4 << 20).unwrap()
    }

    /// Hello, pages, abort and state read back as written; the pages land in guest RAM.
    #[test]
    fn records_round_trip() {
        let mut stream = Vec::new();
        write_hello(&mut stream, 4 << 20).unwrap();
        write_pages(&mut stream, 0x3000, &[7u8; 2 * PAGE_SIZE as usize]).unwrap();
        write_abort(&mut stream, "gone").unwrap();
        write_state(&mut stream, b"{}").unwrap();
        let mut r = stream.as_slice();
        assert_eq!(read_hello(&mut r).unwrap(), 4 << 20);
        let (mem, mut buf) = (ram(), buffer());
        assert!(matches!(
            read_record(&mut r, &mem, &mut buf),
            Ok(Record::Pages(2))
        ));
        let mut page = [0u8; 8];
        mem.read_slice(&mut page, GuestAddress(0x4ff8)).unwrap();
        assert_eq!(page, [7u8; 8]);
        assert!(matches!(read_record(&mut r, &mem, &mut buf), Ok(Record::Abort(t)) if t == "gone"));
        assert!(matches!(read_record(&mut r, &mem, &mut buf), Ok(Record::State(t)) if t == b"{}"));
        let mut answer = Vec::new();
        write_answer(&mut answer, Err("no")).unwrap();
        assert_eq!(
            read_answer(&mut answer.as_slice()).unwrap(),
            Err("no".into())
        );
    }

    /// Bad magic, version, tags, lengths and addresses are refused by name, before any write.
    #[test]
    fn hostile_streams_are_refused() {
        let (mem, mut buf) = (ram(), buffer());
        let mut bad = Vec::new();
        write_hello(&mut bad, 1).unwrap();
        bad[0] = b'X';
        assert!(read_hello(&mut bad.as_slice())
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut bad = Vec::new();
        write_hello(&mut bad, 1).unwrap();
        bad[8] = 9;
        assert!(read_hello(&mut bad.as_slice())
            .unwrap_err()
            .to_string()
            .contains("version 9"));
        let record = |gpa: u64, count: u32| {
            let mut v = vec![TAG_PAGES];
            v.extend_from_slice(&gpa.to_le_bytes());
            v.extend_from_slice(&count.to_le_bytes());
            v
        };
        for (stream, what) in [
            (record(0x1001, 1), "page-aligned"),
            (record(0, 0), "0 pages"),
            (record(0, MAX_RUN as u32 + 1), "at most"),
            (record((4 << 20) - PAGE_SIZE, 2), "not all guest RAM"),
            (record(!0xFFF, 1), "not all guest RAM"),
            (vec![9], "unknown record tag 9"),
            (
                [vec![TAG_STATE], (MAX_STATE + 1).to_le_bytes().to_vec()].concat(),
                "state of",
            ),
        ] {
            let err = read_record(&mut stream.as_slice(), &mem, &mut buf).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        // A truncated record is an I/O error, not a panic.
        let short = [record(0, 1), vec![0u8; 100]].concat();
        assert!(read_record(&mut short.as_slice(), &mem, &mut buf).is_err());
    }
}
