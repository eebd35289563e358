//! A stable, non-cryptographic hash for identifiers and fingerprints.
//!
//! Invariant: the same bytes give the same text on every build, platform and version
//! (unlike `std`'s `DefaultHasher`), because its output is stored in Redis and compared
//! across deployments.

/// FNV-1a 64 of `bytes`, as 16 lower-case hex digits.
pub fn short_hash(bytes: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_reference_values() {
        assert_eq!(super::short_hash(b""), "cbf29ce484222325");
        assert_eq!(super::short_hash(b"a"), "af63dc4c8601ec8c");
    }
}
