//! Raw binaries (`--raw-at`, and the tests' hand-assembled guests): the whole file is one
//! segment at the address the caller names, entered where and in the mode the caller says.

use crate::loader::boot_state::{Entry, Handoff};
use crate::loader::image::{ImageKind, KernelImage};
use crate::loader::layout::Segment;
use crate::loader::request::RawImage;

pub(super) fn parse(image: &[u8], raw: RawImage) -> KernelImage<'_> {
    KernelImage {
        kind: ImageKind::Raw,
        segments: vec![Segment {
            paddr: raw.load_addr,
            data: image,
            mem_size: image.len() as u64,
        }],
        entry: Entry {
            mode: raw.mode,
            rip: raw.entry,
            handoff: Handoff::RbxRdi,
        },
    }
}
