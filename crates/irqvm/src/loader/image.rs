//! What a format parser makes of an image: its kind, the segments to copy and how to enter it.
//! Parsers only read the image; placing it in guest memory is [`crate::loader::layout`]'s job.

use crate::loader::boot_state::Entry;
use crate::loader::layout::Segment;

/// What kind of image was loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    MultibootElf32,
    MultibootElf64,
    MultibootAout,
    Elf32,
    Elf64,
    Raw,
}

/// A parsed image, ready to be checked against guest memory and copied there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct KernelImage<'a> {
    pub kind: ImageKind,
    pub segments: Vec<Segment<'a>>,
    pub entry: Entry,
}
