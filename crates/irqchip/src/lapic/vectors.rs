//! A set of the 256 interrupt vectors, the shape of IRR, ISR and TMR (SDM vol. 3 §11.8.4).

use crate::types::Vector;
use serde::{Deserialize, Serialize};

/// 256 bits; bit `v` is vector `v`. Register `n` of the xAPIC view (IRR0..IRR7 etc.) holds
/// vectors `32n..32n+31`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VectorSet([u64; 4]);

impl VectorSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self([0; 4])
    }

    /// The set whose bit `v % 64` of word `v / 64` is vector `v`.
    pub const fn from_words(words: [u64; 4]) -> Self {
        Self(words)
    }

    /// The four 64-bit words, vector `v` in bit `v % 64` of word `v / 64`.
    pub const fn words(&self) -> [u64; 4] {
        self.0
    }

    fn slot(vector: Vector) -> (usize, u64) {
        (usize::from(vector >> 6), 1u64 << (vector & 63))
    }

    /// True when `vector` is in the set.
    pub fn contains(&self, vector: Vector) -> bool {
        let (word, bit) = Self::slot(vector);
        self.0[word] & bit != 0
    }

    /// Sets `vector`; returns whether it was clear before.
    pub fn insert(&mut self, vector: Vector) -> bool {
        let (word, bit) = Self::slot(vector);
        let was_clear = self.0[word] & bit == 0;
        self.0[word] |= bit;
        was_clear
    }

    /// Clears `vector`; returns whether it was set before.
    pub fn remove(&mut self, vector: Vector) -> bool {
        let (word, bit) = Self::slot(vector);
        let was_set = self.0[word] & bit != 0;
        self.0[word] &= !bit;
        was_set
    }

    /// Sets (`value` true) or clears `vector`.
    pub fn set(&mut self, vector: Vector, value: bool) {
        if value {
            self.insert(vector);
        } else {
            self.remove(vector);
        }
    }

    /// The highest vector in the set (the highest-priority one, SDM §11.8.3).
    pub fn highest(&self) -> Option<Vector> {
        (0..4usize).rev().find_map(|word| {
            let bits = self.0[word];
            // `word * 64 + 63 - lz` is at most 255, so the conversion cannot fail.
            (bits != 0).then(|| {
                Vector::try_from(word * 64 + 63 - bits.leading_zeros() as usize).unwrap_or(0)
            })
        })
    }

    /// True when no vector is set.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    /// Removes every vector.
    pub fn clear(&mut self) {
        self.0 = [0; 4];
    }

    /// The 32-bit register `index` (0-7) of the xAPIC view; 0 for other indices.
    pub fn register(&self, index: usize) -> u32 {
        self.0.get(index / 2).map_or(0, |word| {
            let shift = if index % 2 == 0 { 0 } else { 32 };
            // Truncation to the selected 32 bits is the intent.
            (word >> shift) as u32
        })
    }

    /// Every vector of the set, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = Vector> + '_ {
        (0..=255u8).filter(move |v| self.contains(*v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_highest_register_view() {
        let mut set = VectorSet::new();
        assert_eq!(set.highest(), None);
        assert!(set.insert(0x31));
        assert!(!set.insert(0x31));
        set.insert(0xFF);
        set.insert(0x40);
        assert_eq!(set.highest(), Some(0xFF));
        assert_eq!(set.register(1), 1 << 0x11);
        assert_eq!(set.register(2), 1);
        assert_eq!(set.register(7), 1 << 31);
        assert_eq!(set.register(8), 0);
        assert!(set.remove(0xFF));
        assert!(!set.remove(0xFF));
        assert_eq!(set.highest(), Some(0x40));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0x31, 0x40]);
        set.insert(0);
        set.remove(0x31);
        set.remove(0x40);
        assert_eq!(set.highest(), Some(0));
    }
}
