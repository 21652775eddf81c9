//! A vCPU's XSAVE area (x87, SSE, AVX and every other state component KVM keeps for the guest):
//! read with KVM_GET_XSAVE (KVM_GET_XSAVE2 when KVM_CAP_XSAVE2 gives a larger size), written
//! with KVM_SET_XSAVE, and checked against this host before anything of a snapshot is applied.
//!
//! The area is KVM's user ABI form: the standard (non-compacted) XSAVE layout of SDM vol. 1
//! §13.4: bytes 0-511 the legacy region (FXSAVE's: x87, MXCSR, XMM0-15 at 160-415), bytes 512-575
//! the XSAVE header (XSTATE_BV at 512, XCOMP_BV at 520, which KVM requires 0 here), then each
//! extended component at its CPUID.(EAX=0DH, ECX=i).EBX offset (AVX's YMM upper halves at 576).

use kvm_bindings::{kvm_xsave, Xsave};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::kvm::KvmError;

/// The legacy region and the header: the smallest valid area.
const MIN_LEN: usize = 576;
const XSTATE_BV: usize = 512;
const XCOMP_BV: usize = 520;
/// The XMM registers in the legacy region (SDM vol. 1 §10.5.1, table 10-2).
pub const XMM: std::ops::Range<usize> = 160..416;
/// x87 and SSE: the components KVM_SET_FPU carries as well.
const XCR0_X87_SSE: u64 = 0b11;
/// The size of the plain `kvm_xsave`.
const KVM_XSAVE_LEN: usize = std::mem::size_of::<kvm_xsave>();

/// The XSAVE area's bytes, as KVM's user ABI has them (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XsaveArea(pub Vec<u8>);

/// What this host's KVM offers for the XSAVE state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XsaveHost {
    /// The area's size in bytes: KVM_CAP_XSAVE2's size, at least `kvm_xsave`'s 4096; 0 without
    /// KVM_CAP_XSAVE.
    pub size: usize,
    /// The XCR0 bits KVM supports (KVM_GET_SUPPORTED_CPUID leaf 0DH subleaf 0, EDX:EAX).
    pub supported_xcr0: u64,
}

impl XsaveHost {
    /// Asks `kvm` and `vm` (KVM_CAP_XSAVE2 is per VM: a VM may have been granted more state).
    pub fn probe(kvm: &Kvm, vm: &VmFd, supported: &kvm_bindings::CpuId) -> Self {
        let size = if kvm.check_extension(Cap::Xsave) {
            usize::try_from(vm.check_extension_int(Cap::Xsave2))
                .unwrap_or(0)
                .max(KVM_XSAVE_LEN)
        } else {
            0
        };
        let supported_xcr0 = supported
            .as_slice()
            .iter()
            .find(|e| e.function == 0xD && e.index == 0)
            .map_or(XCR0_X87_SSE, |e| u64::from(e.eax) | u64::from(e.edx) << 32);
        Self {
            size,
            supported_xcr0,
        }
    }
}

/// Why a saved XSAVE area (or XCR0) cannot be given to this host's KVM.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XsaveProblem {
    #[error("has {found} bytes, less than the {MIN_LEN} of the legacy region and header")]
    TooShort { found: usize },
    #[error("has {found} bytes, not a whole number of 32-bit words")]
    Ragged { found: usize },
    #[error("is in the compacted format (XCOMP_BV {xcomp_bv:#x}); KVM takes the standard one")]
    Compacted { xcomp_bv: u64 },
    #[error(
        "holds state components {found:#x} (XSTATE_BV) beyond what this host supports ({supported:#x})"
    )]
    Components { found: u64, supported: u64 },
    #[error("has {found} bytes with state past this KVM's {max}-byte area (KVM_CAP_XSAVE2)")]
    TooLarge { found: usize, max: usize },
    #[error("holds state beyond x87/SSE ({found:#x}) and this KVM has no KVM_CAP_XSAVE")]
    NoXsave { found: u64 },
    #[error("XCR0 {found:#x} enables components this host does not support ({supported:#x})")]
    Xcr0 { found: u64, supported: u64 },
}

impl XsaveArea {
    fn u64_at(&self, at: usize) -> u64 {
        self.0
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }

    /// XSTATE_BV: the components the area holds (others are in their initial state).
    pub fn xstate_bv(&self) -> u64 {
        self.u64_at(XSTATE_BV)
    }

    /// The checks that need no host: length and format.
    pub fn check_shape(&self) -> Result<(), XsaveProblem> {
        let found = self.0.len();
        if found < MIN_LEN {
            return Err(XsaveProblem::TooShort { found });
        }
        if found % 4 != 0 {
            return Err(XsaveProblem::Ragged { found });
        }
        let xcomp_bv = self.u64_at(XCOMP_BV);
        if xcomp_bv != 0 {
            return Err(XsaveProblem::Compacted { xcomp_bv });
        }
        Ok(())
    }

    /// Whether `host` can take the area exactly: its components supported, nothing past the
    /// host's size (trailing zeros are the initial state of components this host lacks and may
    /// be dropped).
    pub fn check_for(&self, host: XsaveHost) -> Result<(), XsaveProblem> {
        self.check_shape()?;
        let found = self.xstate_bv();
        if host.size == 0 {
            return match found & !XCR0_X87_SSE {
                0 => Ok(()),
                _ => Err(XsaveProblem::NoXsave { found }),
            };
        }
        if found & !host.supported_xcr0 != 0 {
            return Err(XsaveProblem::Components {
                found,
                supported: host.supported_xcr0,
            });
        }
        let used = self.0.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        if used > host.size {
            return Err(XsaveProblem::TooLarge {
                found: self.0.len(),
                max: host.size,
            });
        }
        Ok(())
    }
}

/// Checks a saved XCR0 against `host` (KVM_SET_XCRS refuses unsupported bits).
pub fn check_xcr0(xcr0: u64, host: XsaveHost) -> Result<(), XsaveProblem> {
    let supported = host.supported_xcr0 | 1;
    if xcr0 & !supported != 0 {
        return Err(XsaveProblem::Xcr0 {
            found: xcr0,
            supported,
        });
    }
    Ok(())
}

fn words_to_bytes(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A `kvm_xsave2` wrapper with room for `len` bytes past the plain `kvm_xsave`.
fn xsave2_of(len: usize) -> Result<Xsave, KvmError> {
    let fam = len.saturating_sub(KVM_XSAVE_LEN).div_ceil(4);
    Xsave::new(fam).map_err(|_| KvmError::TooManyEntries {
        what: "KVM_GET/SET_XSAVE2 area",
        entries: fam,
    })
}

/// Reads the vCPU's XSAVE area (`None` without KVM_CAP_XSAVE).
pub fn read(vcpu: &VcpuFd, host: XsaveHost) -> Result<Option<XsaveArea>, KvmError> {
    if host.size == 0 {
        return Ok(None);
    }
    if host.size <= KVM_XSAVE_LEN {
        let x = vcpu.get_xsave().map_err(KvmError::ioctl("KVM_GET_XSAVE"))?;
        return Ok(Some(XsaveArea(words_to_bytes(&x.region))));
    }
    let mut x = xsave2_of(host.size)?;
    // SAFETY: `x` was allocated for `host.size` bytes, KVM_CAP_XSAVE2's size for this VM, which
    // is the most KVM_GET_XSAVE2 writes.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(KvmError::ioctl("KVM_GET_XSAVE2"))?;
    let mut bytes = words_to_bytes(&x.as_fam_struct_ref().xsave.region);
    bytes.extend(words_to_bytes(x.as_slice()));
    bytes.truncate(host.size);
    Ok(Some(XsaveArea(bytes)))
}

/// Writes `area` (checked with [`XsaveArea::check_for`]) into the vCPU, zero-filled to the
/// host's size.
pub fn write(vcpu: &VcpuFd, area: &XsaveArea, host: XsaveHost) -> Result<(), KvmError> {
    let bytes = &area.0[..area.0.len().min(host.size)];
    if host.size <= KVM_XSAVE_LEN {
        let mut x = kvm_xsave::default();
        fill_words(&mut x.region, bytes);
        // SAFETY: `x` is a whole, initialised `kvm_xsave`; with KVM_CAP_XSAVE2's size at most
        // its 4096 bytes, that is all KVM_SET_XSAVE reads.
        return unsafe { vcpu.set_xsave(&x) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"));
    }
    let mut x = xsave2_of(host.size)?;
    let (head, tail) = bytes.split_at(bytes.len().min(KVM_XSAVE_LEN));
    // SAFETY: only the fixed `region` is written, never the length the wrapper keeps for its
    // flexible array.
    let region = unsafe { &mut x.as_mut_fam_struct().xsave.region };
    fill_words(region, head);
    fill_words(x.as_mut_slice(), tail);
    // SAFETY: `x` holds `host.size` bytes, KVM_CAP_XSAVE2's size, which is what KVM_SET_XSAVE
    // reads on a VM whose area is larger than `kvm_xsave`.
    unsafe { vcpu.set_xsave2(&x) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"))
}

fn fill_words(words: &mut [u32], bytes: &[u8]) {
    for (word, chunk) in words.iter_mut().zip(bytes.chunks(4)) {
        let mut b = [0u8; 4];
        b[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_le_bytes(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: XsaveHost = XsaveHost {
        size: 4096,
        supported_xcr0: 0x207,
    };

    fn area(bv: u64) -> XsaveArea {
        let mut b = vec![0u8; 4096];
        b[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
        XsaveArea(b)
    }

    #[test]
    fn an_area_of_this_host_passes() {
        assert_eq!(area(0b111).check_for(HOST), Ok(()));
        assert_eq!(check_xcr0(0x207, HOST), Ok(()));
    }

    /// Each mismatch with the host, and each malformed area, is named.
    #[test]
    fn mismatches_are_named() {
        assert_eq!(
            area(0xE7).check_for(HOST),
            Err(XsaveProblem::Components {
                found: 0xE7,
                supported: 0x207
            })
        );
        let mut compacted = area(3);
        compacted.0[XCOMP_BV + 7] = 0x80;
        assert!(matches!(
            compacted.check_for(HOST),
            Err(XsaveProblem::Compacted { .. })
        ));
        assert_eq!(
            XsaveArea(vec![0; 100]).check_shape(),
            Err(XsaveProblem::TooShort { found: 100 })
        );
        assert_eq!(
            XsaveArea(vec![0; 577]).check_shape(),
            Err(XsaveProblem::Ragged { found: 577 })
        );
        let mut big = area(3);
        big.0.resize(8192, 0);
        assert_eq!(big.check_for(HOST), Ok(()), "trailing zeros are dropped");
        big.0[5000] = 1;
        assert_eq!(
            big.check_for(HOST),
            Err(XsaveProblem::TooLarge {
                found: 8192,
                max: 4096
            })
        );
        let none = XsaveHost { size: 0, ..HOST };
        assert_eq!(area(3).check_for(none), Ok(()));
        assert_eq!(
            area(7).check_for(none),
            Err(XsaveProblem::NoXsave { found: 7 })
        );
        assert!(matches!(
            check_xcr0(1 << 17, HOST),
            Err(XsaveProblem::Xcr0 { .. })
        ));
    }
}
