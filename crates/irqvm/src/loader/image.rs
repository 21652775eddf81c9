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
    /// An ELF kernel with the Xen PVH entry note (a Linux vmlinux), entered in 32-bit mode.
    Pvh,
    /// A Linux bzImage, entered through the 64-bit boot protocol.
    BzImage,
}

impl ImageKind {
    /// True for the Linux boot protocols, whose command line is the arguments alone (no file
    /// name first, unlike multiboot's: see [`crate::loader::kernel_cmdline`]).
    pub fn is_linux(self) -> bool {
        matches!(self, ImageKind::Pvh | ImageKind::BzImage)
    }
}

/// A parsed image, ready to be checked against guest memory and copied there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct KernelImage<'a> {
    pub kind: ImageKind,
    pub segments: Vec<Segment<'a>>,
    pub entry: Entry,
}
