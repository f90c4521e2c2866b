//! Links the `holdfast` binary as a fixed-address executable (not PIE).
//!
//! The keeper is a long-lived process whose memory we count: a PIE binary
//! has its relocated pointers (vtables, string tables; ~100 KiB here)
//! written at start-up, which makes those pages private and dirty in every
//! keeper. Linked at a fixed address they stay clean, shared with the file.

fn main() {
    println!("cargo:rustc-link-arg-bin=holdfast=-no-pie");
}
