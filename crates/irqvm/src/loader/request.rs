//! What a caller asks the loader for: the kernel's bytes, its command line, its modules, and
//! optionally how to place a raw binary.

use crate::loader::boot_state::CpuMode;

/// A raw binary: copied to `load_addr` and entered at `entry` in `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawImage {
    pub load_addr: u64,
    pub entry: u64,
    pub mode: CpuMode,
}

/// A boot module (`--initrd`): its bytes and the string the kernel sees for it.
#[derive(Clone, Debug)]
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: String,
}

/// Everything the loader needs.
#[derive(Clone, Debug)]
pub struct LoadRequest<'a> {
    pub kernel: &'a [u8],
    /// The kernel's command line as the kernel sees it: "FILENAME ARGS" (see [`kernel_cmdline`]).
    pub cmdline: String,
    pub modules: Vec<Module<'a>>,
    /// Load the kernel as a raw binary instead of detecting its format.
    pub raw: Option<RawImage>,
}

/// The command line a multiboot kernel sees, as QEMU and GRUB pass it: the kernel's file name
/// followed by the arguments.
pub fn kernel_cmdline(file_name: &str, args: &str) -> String {
    if args.is_empty() {
        file_name.to_string()
    } else {
        format!("{file_name} {args}")
    }
}
