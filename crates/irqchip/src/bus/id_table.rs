//! A read-only multimap from a 32-bit key (an APIC ID, a logical cluster, a logical-ID bit) to the
//! vCPUs that have it, built once per topology snapshot.
//!
//! Keys below [`DENSE_KEY_LIMIT`] are looked up by direct indexing (one probe, whatever the
//! number of vCPUs): the table keeps, like a compressed sparse row, one start offset per key
//! into a single list of vCPU indices grouped by key. Keys at or above the limit go to a sorted
//! side list searched in O(log n). No VMM topology of up to KVM's vCPU count reaches them: KVM's
//! vCPU IDs (which are the x2APIC IDs a KVM-backed VMM can give) stop at 4096, and xAPIC IDs,
//! logical clusters (x2APIC ID\[19:4\] for such IDs) and logical-ID bits are far smaller. The
//! dense part is sized by the largest key present, not by the limit, so a 4-vCPU VM pays for 4
//! keys.

use crate::types::VcpuIndex;

/// Keys below this are indexed directly; 4096 is KVM's largest vCPU ID + 1 (KVM_MAX_VCPU_IDS).
pub(super) const DENSE_KEY_LIMIT: u32 = 4096;

/// Key -> vCPUs, each key's vCPUs in ascending index order.
#[derive(Debug, Default)]
pub(super) struct IdTable {
    /// `starts[k]..starts[k + 1]` is the range of `members` holding key `k`; empty when no
    /// dense key is present. Length = largest dense key + 2.
    starts: Vec<u32>,
    /// vCPU indices, grouped by key (dense keys first), ascending within a key.
    members: Vec<VcpuIndex>,
    /// Keys at or above [`DENSE_KEY_LIMIT`], sorted, and the vCPU of each (parallel lists).
    sparse_keys: Vec<u32>,
    sparse_members: Vec<VcpuIndex>,
}

impl IdTable {
    /// Builds the table from (key, vCPU index) pairs in any order.
    pub(super) fn build(mut pairs: Vec<(u32, VcpuIndex)>) -> Self {
        pairs.sort_unstable();
        let dense_len = pairs.partition_point(|&(key, _)| key < DENSE_KEY_LIMIT);
        let sparse = pairs.split_off(dense_len);
        let key_count = pairs.last().map_or(0, |&(key, _)| key as usize + 1);
        let mut starts = Vec::with_capacity(if key_count == 0 { 0 } else { key_count + 1 });
        let mut next = 0usize;
        for key in 0..key_count {
            starts.push(next as u32);
            // u32 -> usize is lossless on the 64-bit targets this crate runs on.
            while next < pairs.len() && pairs[next].0 as usize == key {
                next += 1;
            }
        }
        if key_count != 0 {
            starts.push(next as u32);
        }
        Self {
            starts,
            members: pairs.into_iter().map(|(_, index)| index).collect(),
            sparse_keys: sparse.iter().map(|&(key, _)| key).collect(),
            sparse_members: sparse.into_iter().map(|(_, index)| index).collect(),
        }
    }

    /// The vCPUs with key `key`, ascending. One probe for a dense key, a binary search for a
    /// sparse one.
    pub(super) fn get(&self, key: u32) -> &[VcpuIndex] {
        if key < DENSE_KEY_LIMIT {
            return self.dense(key as usize);
        }
        let start = self.sparse_keys.partition_point(|&k| k < key);
        let len = self.sparse_keys[start..].partition_point(|&k| k == key);
        &self.sparse_members[start..start + len]
    }

    fn dense(&self, key: usize) -> &[VcpuIndex] {
        match (self.starts.get(key), self.starts.get(key + 1)) {
            (Some(&start), Some(&end)) => &self.members[start as usize..end as usize],
            _ => &[],
        }
    }

    /// Heap bytes the table holds (for the memory-per-vCPU measurement).
    pub(super) fn heap_bytes(&self) -> usize {
        self.starts.capacity() * std::mem::size_of::<u32>()
            + self.members.capacity() * std::mem::size_of::<VcpuIndex>()
            + self.sparse_keys.capacity() * std::mem::size_of::<u32>()
            + self.sparse_members.capacity() * std::mem::size_of::<VcpuIndex>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_finds_nothing() {
        let table = IdTable::build(Vec::new());
        for key in [0, 1, DENSE_KEY_LIMIT, u32::MAX] {
            assert!(table.get(key).is_empty());
        }
        assert_eq!(table.heap_bytes(), 0);
    }

    #[test]
    fn dense_keys_group_duplicates_in_index_order() {
        let table = IdTable::build(vec![(5, 9), (0, 3), (5, 1), (7, 2), (5, 4)]);
        assert_eq!(table.get(0), &[3]);
        assert_eq!(table.get(5), &[1, 4, 9]);
        assert_eq!(table.get(7), &[2]);
        for absent in [1, 4, 6, 8, 100] {
            assert!(table.get(absent).is_empty(), "key {absent}");
        }
    }

    #[test]
    fn keys_at_or_past_the_limit_use_the_sparse_list() {
        let keys = [DENSE_KEY_LIMIT - 1, DENSE_KEY_LIMIT, 0x8000, u32::MAX];
        let pairs = keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
        let table = IdTable::build(pairs);
        for (index, key) in keys.into_iter().enumerate() {
            assert_eq!(table.get(key), &[index], "key {key:#x}");
        }
        assert!(table.get(DENSE_KEY_LIMIT + 1).is_empty());
        // The dense part stops at the largest dense key.
        assert_eq!(table.starts.len(), DENSE_KEY_LIMIT as usize + 1);
    }
}
