//! Stable hashes: the same value for the same bytes in every process, on every platform
//! and in every version, because nodes compare what they compute.
//!
//! The Router's consistent hashing needs every node to map a key to the same owner, and
//! the cluster's Raft ids are a hash of the node name that every node must agree on.
//! Both build on [`stable_hash`] (FNV-1a, 64 bit) and one of two finalisers that spread
//! its bits. The pinned values in the tests below must never change: a change would move
//! every key to another node and give every node another Raft id.

/// FNV-1a (64 bit) of `bytes`: tiny, stable, and good enough for short names and keys.
/// Its low bits are weak; pass it through [`mix`] or [`fold`] before taking a few bits.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: spreads the bits of a combined hash evenly. The Router's
/// rendezvous scores use it.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A shorter finaliser (xor-shift 33, multiply, xor-shift 33: the first half of
/// MurmurHash3's `fmix64`). The cluster's Raft id of a node is `fold(stable_hash(name))`.
pub fn fold(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// The stable 64-bit id of a name: [`stable_hash`] then [`fold`]. What the cluster uses
/// as a node's Raft id.
pub fn stable_id(name: &str) -> u64 {
    fold(stable_hash(name.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values every node and every version agree on. Never change them.
    #[test]
    fn outputs_are_pinned() {
        // FNV-1a's published test vectors.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(mix(0), 0);
        assert_eq!(mix(1), 0x5692_161d_100b_05e5);
        assert_eq!(stable_id("node-1"), PINNED_NODE_1);
        assert_eq!(stable_id("node-2"), PINNED_NODE_2);
        assert_eq!(stable_id(""), PINNED_EMPTY);
    }

    const PINNED_NODE_1: u64 = 0xcbb5_a197_d2e0_cc71;
    const PINNED_NODE_2: u64 = 0x8560_3075_9bc3_6dd1;
    const PINNED_EMPTY: u64 = 0xecba_3df2_c338_3c52;

    /// The Raft id formula as the cluster crate wrote it before it moved here.
    fn raft_id_as_written(name: &str) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }

    proptest::proptest! {
        #[test]
        fn stable_id_is_the_cluster_raft_id(name in ".{0,40}") {
            proptest::prop_assert_eq!(stable_id(&name), raft_id_as_written(&name));
        }
    }
}
