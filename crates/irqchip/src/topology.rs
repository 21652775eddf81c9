//! Which initial APIC ID each vCPU gets.
//!
//! Hardware builds the initial APIC ID from the processor's place in the package hierarchy:
//! thread, core, die and package numbers in bit fields each as wide as its level needs, rounded
//! up to a power of two (SDM vol. 3 §9.9.1 "Hierarchical Mapping of Shared Resources"; the
//! shifts are what CPUID leaves 0xB and 0x1F report). So 3 threads per core take 2 bits and
//! leave ID gaps (thread number 3 never exists), and a 6-core socket takes 3 bits. A VMM that
//! advertises a topology in CPUID must give the APICs the same IDs; one that does not can pack
//! them (ID = vCPU index), as KVM's default vCPU IDs do.

use serde::{Deserialize, Serialize};

use crate::types::{ApicId, VcpuIndex};

/// How vCPU indices map to initial APIC IDs. vCPUs are numbered thread first, then core, die
/// and socket (vCPU 0 is thread 0 of core 0 of die 0 of socket 0, the bootstrap processor).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ApicIdLayout {
    /// APIC ID = vCPU index.
    #[default]
    Packed,
    /// Bit fields per level (SDM vol. 3 §9.9.1). Counts of 0 are read as 1.
    Hierarchy {
        /// Logical processors per core.
        threads: u32,
        /// Cores per die.
        cores: u32,
        /// Dies per socket.
        dies: u32,
    },
}

/// Bits a level with `count` members needs: ceil(log2(count)), 0 for a single member.
fn field_bits(count: u32) -> u32 {
    // Past 2^31 members the next power of two is 2^32: 32 bits.
    count
        .max(1)
        .checked_next_power_of_two()
        .map_or(u32::BITS, u32::trailing_zeros)
}

/// `value << shift`, `None` when bits would be lost.
fn place(value: u64, shift: u32) -> Option<u64> {
    if value == 0 {
        return Some(0);
    }
    value
        .checked_shl(shift)
        .filter(|placed| placed >> shift == value)
}

impl ApicIdLayout {
    /// Width in bits of the thread, core and die fields (CPUID leaf 0x1F's shifts are their
    /// running sums).
    pub fn field_bits(self) -> [u32; 3] {
        match self {
            Self::Packed => [0; 3],
            Self::Hierarchy {
                threads,
                cores,
                dies,
            } => [field_bits(threads), field_bits(cores), field_bits(dies)],
        }
    }

    /// The initial APIC ID of vCPU `index`, `None` if it does not fit 32 bits.
    pub fn apic_id(self, index: VcpuIndex) -> Option<ApicId> {
        let index = u64::try_from(index).ok()?;
        let Self::Hierarchy {
            threads,
            cores,
            dies,
        } = self
        else {
            return u32::try_from(index).ok().map(ApicId);
        };
        let mut rest = index;
        let mut id = 0u64;
        let mut shift = 0u32;
        for (count, bits) in [threads, cores, dies].into_iter().zip(self.field_bits()) {
            let count = u64::from(count.max(1));
            id |= place(rest % count, shift)?;
            rest /= count;
            shift += bits;
        }
        // What is left is the socket number, in the bits above the die field.
        u32::try_from(id | place(rest, shift)?).ok().map(ApicId)
    }

    /// The largest initial APIC ID of `vcpus` vCPUs (`None` for 0 vCPUs or an overflow).
    pub fn max_apic_id(self, vcpus: usize) -> Option<ApicId> {
        // IDs grow with the index: every field is filled low-to-high, in index order.
        self.apic_id(vcpus.checked_sub(1)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(layout: ApicIdLayout, n: usize) -> Vec<u32> {
        (0..n).map(|i| layout.apic_id(i).unwrap().0).collect()
    }

    #[test]
    fn packed_is_the_index() {
        assert_eq!(ids(ApicIdLayout::Packed, 5), vec![0, 1, 2, 3, 4]);
        assert_eq!(ApicIdLayout::Packed.max_apic_id(1024), Some(ApicId(1023)));
        assert_eq!(ApicIdLayout::Packed.max_apic_id(0), None);
    }

    /// SDM vol. 3 §9.9.1: 3 threads take 2 bits, 3 cores take 2 bits: gaps at thread 3 and
    /// core 3.
    #[test]
    fn hierarchy_fields_round_up_to_powers_of_two() {
        let layout = ApicIdLayout::Hierarchy {
            threads: 3,
            cores: 3,
            dies: 1,
        };
        assert_eq!(layout.field_bits(), [2, 2, 0]);
        assert_eq!(
            ids(layout, 10),
            vec![0, 1, 2, 4, 5, 6, 8, 9, 10, 16] // socket 1 starts at bit 4
        );
    }

    #[test]
    fn two_threads_and_dies_pack_exactly() {
        let layout = ApicIdLayout::Hierarchy {
            threads: 2,
            cores: 4,
            dies: 2,
        };
        assert_eq!(layout.field_bits(), [1, 2, 1]);
        assert_eq!(ids(layout, 17), (0..17).collect::<Vec<_>>());
        // 1024 vCPUs of 6-core, 2-thread sockets: IDs run past 1023, with gaps.
        let gappy = ApicIdLayout::Hierarchy {
            threads: 2,
            cores: 6,
            dies: 1,
        };
        assert_eq!(gappy.apic_id(12), Some(ApicId(16)));
        assert_eq!(gappy.max_apic_id(1024), Some(ApicId(85 << 4 | 1 << 1 | 1)));
    }

    #[test]
    fn zero_counts_read_as_one_and_overflow_is_none() {
        let layout = ApicIdLayout::Hierarchy {
            threads: 0,
            cores: 0,
            dies: 0,
        };
        assert_eq!(ids(layout, 3), vec![0, 1, 2]);
        let wide = ApicIdLayout::Hierarchy {
            threads: u32::MAX,
            cores: u32::MAX,
            dies: 1,
        };
        assert_eq!(wide.field_bits(), [32, 32, 0]);
        assert_eq!(wide.apic_id(0), Some(ApicId(0)));
        assert_eq!(wide.apic_id(1), Some(ApicId(1)));
        assert_eq!(wide.apic_id(usize::MAX), None);
    }
}
