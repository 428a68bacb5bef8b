//! `cluster.bootstrap = "ordinal"`: a StatefulSet pod's place in the cluster, derived from
//! its identity alone (pure: the caller reads the keys, this module only computes).
//!
//! A pod of a StatefulSet is named `<set>-<ordinal>` and, through the set's headless
//! Service, has the stable DNS name `<pod>.<service>.<namespace>.svc.<domain>`. From that:
//! the node id is the pod name, the cluster address other nodes dial is that DNS name and
//! the cluster port, and the seeds are the same names of ordinals `0..seed_ordinals`
//! other than this pod's. Ordinal 0 may bootstrap a new cluster when no seed belongs to
//! one; every other ordinal only joins.

/// What a pod's identity makes of its cluster settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PodPlace {
    /// The node id: the pod name.
    pub(super) node: String,
    /// `<pod>.<service>.<namespace>.svc.<domain>`, without a port.
    pub(super) host: String,
    /// `host:port` of the other seed ordinals, lowest first.
    pub(super) seeds: Vec<String>,
    /// Whether this is ordinal 0, the one pod that may bootstrap.
    pub(super) first: bool,
}

/// The StatefulSet ordinal at the end of a pod name (`opmesh-2` → `("opmesh", 2)`), or
/// `None` when the name does not end in `-<digits>` after a non-empty set name.
pub(super) fn split_pod_name(pod: &str) -> Option<(&str, u32)> {
    let (set, ordinal) = pod.rsplit_once('-')?;
    let valid = !set.is_empty()
        && !ordinal.is_empty()
        && ordinal.bytes().all(|b| b.is_ascii_digit())
        && (ordinal == "0" || !ordinal.starts_with('0'));
    valid.then_some(())?;
    Some((set, ordinal.parse().ok()?))
}

/// The place of `pod` (already checked with [`split_pod_name`]) in a set whose headless
/// Service is `service` in `namespace`, under the cluster domain `domain`.
pub(super) fn place(
    pod: &str,
    service: &str,
    namespace: &str,
    domain: &str,
    port: u16,
    seed_ordinals: u32,
) -> Option<PodPlace> {
    let (set, ordinal) = split_pod_name(pod)?;
    let host_of = |name: &str| format!("{name}.{service}.{namespace}.svc.{domain}");
    let seeds = (0..seed_ordinals)
        .filter(|i| *i != ordinal)
        .map(|i| format!("{}:{port}", host_of(&format!("{set}-{i}"))))
        .collect();
    Some(PodPlace {
        node: pod.to_owned(),
        host: host_of(pod),
        seeds,
        first: ordinal == 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_name_ends_in_its_ordinal() {
        assert_eq!(split_pod_name("opmesh-0"), Some(("opmesh", 0)));
        assert_eq!(split_pod_name("my-set-12"), Some(("my-set", 12)));
        for bad in [
            "opmesh",
            "opmesh-",
            "-3",
            "opmesh-x",
            "opmesh-01",
            "opmesh-+1",
        ] {
            assert_eq!(split_pod_name(bad), None, "{bad}");
        }
        assert_eq!(split_pod_name("opmesh-99999999999"), None, "too large");
    }

    #[test]
    fn the_seeds_are_the_other_seed_ordinals_dns_names() {
        let p = place("opmesh-1", "opmesh-peers", "prod", "cluster.local", 7071, 3).unwrap();
        assert_eq!(p.node, "opmesh-1");
        assert_eq!(p.host, "opmesh-1.opmesh-peers.prod.svc.cluster.local");
        assert_eq!(
            p.seeds,
            [
                "opmesh-0.opmesh-peers.prod.svc.cluster.local:7071",
                "opmesh-2.opmesh-peers.prod.svc.cluster.local:7071",
            ]
        );
        assert!(!p.first);

        let p = place("opmesh-0", "s", "n", "example.org", 1, 3).unwrap();
        assert!(p.first);
        assert_eq!(
            p.seeds,
            [
                "opmesh-1.s.n.svc.example.org:1",
                "opmesh-2.s.n.svc.example.org:1"
            ]
        );

        // A pod beyond the seed ordinals (scaled out) joins through all of them.
        let p = place("opmesh-7", "s", "n", "d", 1, 3).unwrap();
        assert_eq!(p.seeds.len(), 3);

        // A set of one: ordinal 0 has no seed and bootstraps when it has no state.
        assert!(place("opmesh-0", "s", "n", "d", 1, 1)
            .unwrap()
            .seeds
            .is_empty());
    }
}
