//! The reference side of the invariants: 256-bit vector sets and the priority formulas of the
//! SDM, written from the manual and independent of the model's own code.

use std::fmt;

/// A set of interrupt vectors, bit v = vector v.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Vectors(pub [u64; 4]);

impl Vectors {
    /// From the eight 32-bit registers ISR/TMR/IRR 0-7 (register n holds vectors 32n..32n+31,
    /// SDM vol. 3 §11.8.4).
    pub fn from_registers(regs: [u32; 8]) -> Self {
        let mut set = Self::default();
        for (n, reg) in regs.iter().enumerate() {
            set.0[n / 2] |= u64::from(*reg) << (32 * (n % 2));
        }
        set
    }

    pub fn contains(&self, v: u8) -> bool {
        self.0[usize::from(v / 64)] & (1 << (v % 64)) != 0
    }

    pub fn insert(&mut self, v: u8) {
        self.0[usize::from(v / 64)] |= 1 << (v % 64);
    }

    pub fn union(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] | other.0[i]))
    }

    pub fn minus(&self, other: &Self) -> Self {
        Self(std::array::from_fn(|i| self.0[i] & !other.0[i]))
    }

    pub fn is_empty(&self) -> bool {
        self.0 == [0; 4]
    }

    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        (0..=255u8).filter(|v| self.contains(*v))
    }

    /// The highest vector, 0 for the empty set (the SDM's ISRV/IRRV convention).
    pub fn highest(&self) -> u8 {
        self.iter().last().unwrap_or(0)
    }
}

impl fmt::Debug for Vectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(|v| format!("{v:#04x}")))
            .finish()
    }
}

/// The priority class of a vector or priority register: bits 7:4.
pub fn class(value: u8) -> u8 {
    value >> 4
}

/// PPR (SDM vol. 3 §11.8.3.1): IF TPR[7:4] >= ISRV[7:4] THEN PPR := TPR ELSE PPR[7:4] :=
/// ISRV[7:4], PPR[3:0] := 0.
pub fn sdm_ppr(tpr: u8, isrv: u8) -> u8 {
    if class(tpr) >= class(isrv) {
        tpr
    } else {
        isrv & 0xF0
    }
}

/// APR (SDM vol. 3 §11.6.2.4, "Arbitration Priority Register"): IF TPR[7:4] >= IRRV[7:4] AND
/// TPR[7:4] > ISRV[7:4] THEN APR := TPR ELSE APR[7:4] := max(TPR[7:4] AND ISRV[7:4], IRRV[7:4]),
/// APR[3:0] := 0. The "AND" inside max() is read as a list ("the larger of TPR, ISRV and
/// IRRV"), not a bitwise AND: a processor servicing class 4 with TPR 0 must not arbitrate as an
/// idle one (see docs/fuzzing.md).
pub fn sdm_apr(tpr: u8, isrv: u8, irrv: u8) -> u8 {
    if class(tpr) >= class(irrv) && class(tpr) > class(isrv) {
        tpr
    } else {
        class(tpr).max(class(isrv)).max(class(irrv)) << 4
    }
}

/// The vector an INTA should take now: the highest IRR vector if its class beats the PPR's
/// class (SDM vol. 3 §11.8.3.1), else none.
pub fn deliverable(irr: &Vectors, ppr: u8) -> Option<u8> {
    let v = irr.highest();
    (!irr.is_empty() && class(v) > class(ppr)).then_some(v)
}
