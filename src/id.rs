//! Random identifiers (claim owner tokens, event message ids).
//!
//! `Uuid::new_v4` asks the kernel for its 16 bytes on every call: a system call per id,
//! two per delivery. The thread-local generator is a CSPRNG seeded from the kernel, which
//! is as unpredictable as these ids need to be (they only have to be unique).

use rand::RngExt;

/// A random (version 4) UUID.
pub fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_version_4_and_distinct() {
        let a = random_uuid();
        let b = random_uuid();
        assert_eq!(a.get_version_num(), 4);
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
    }
}
