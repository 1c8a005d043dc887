//! containerd's ctr pulling through pullgate: directly, and as the docker.io mirror through
//! hosts.toml (so every request carries `?ns=docker.io`).

use crate::harness::{registry, Gateway};
use crate::support::{
    write_hosts_toml, Containerd, PullOpts, TestImage, Upstream, UpstreamOptions,
};

#[test]
fn ctr_pulls_directly_and_as_docker_io_mirror() {
    let up = Upstream::start(UpstreamOptions::default());
    let small = TestImage::small("ctr-small");
    let index = TestImage::two_platform_index("ctr-index");
    let alpine = TestImage::small("ctr-alpine");
    up.push(&small, "team/small:v1");
    up.push(&index, "team/index:v1");
    up.push(&alpine, "library/alpine:3.20");
    let gw = Gateway::start(&registry(
        "hub",
        &up,
        "ns = [\"docker.io\"]\ndefault = true",
    ));
    let ctr = Containerd::start();

    // Directly: ctr talks plain HTTP to pullgate and holds no credentials.
    let reference = format!("{}/team/small:v1", gw.addr());
    let digest = ctr
        .pull_with(
            &reference,
            &PullOpts {
                plain_http: true,
                ..Default::default()
            },
        )
        .expect("ctr pulls directly");
    assert_eq!(digest, small.manifest_digest());
    let reference = format!("{}/team/index:v1", gw.addr());
    let digest = ctr
        .pull_with(
            &reference,
            &PullOpts {
                plain_http: true,
                all_platforms: true,
                ..Default::default()
            },
        )
        .expect("ctr pulls the index");
    assert_eq!(digest, index.manifest_digest());

    // As the docker.io mirror: containerd appends ?ns=docker.io; docker.io itself is
    // unreachable here (proxy env points at a closed port), so success proves the mirror.
    let hosts = tempfile::tempdir().expect("tempdir");
    write_hosts_toml(
        hosts.path(),
        "docker.io",
        &format!("http://{}", gw.addr()),
        Some("https://registry-1.docker.io"),
        None,
        false,
    );
    let digest = ctr
        .pull_with(
            "docker.io/library/alpine:3.20",
            &PullOpts {
                hosts_dir: Some(hosts.path().to_path_buf()),
                ..Default::default()
            },
        )
        .expect("ctr pulls docker.io/library/alpine through the mirror");
    assert_eq!(digest, alpine.manifest_digest());
    assert!(up.count_requests("GET", "/v2/library/alpine/") >= 1);
}
