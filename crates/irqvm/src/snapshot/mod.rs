//! Snapshots of a VM. So far: [`convert`], the one conversion between the `irqchip` model's
//! state and KVM's formats, which lets a snapshot taken in any irqchip mode restore into any
//! other (docs/architecture.md, "Snapshots across modes: the conversion").

pub mod convert;
