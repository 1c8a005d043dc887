use super::*;

#[test]
fn parses_docker_hub_style_bearer_challenge() {
    let got = parse_challenges(
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
    );
    assert_eq!(
        got,
        vec![Challenge::Bearer {
            realm: "https://auth.docker.io/token".into(),
            service: Some("registry.docker.io".into()),
            scope: Some("repository:library/alpine:pull".into()),
            error: None,
        }]
    );
}

#[test]
fn parses_scope_with_commas_error_and_escapes() {
    let got = parse_challenges(
        r#"Bearer realm="https://r/t", service="svc", scope="repository:a/b:pull,push", error="insufficient_scope", x="q\"uote""#,
    );
    match &got[0] {
        Challenge::Bearer { scope, error, .. } => {
            assert_eq!(scope.as_deref(), Some("repository:a/b:pull,push"));
            assert_eq!(error.as_deref(), Some("insufficient_scope"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn parses_basic_and_several_challenges() {
    assert_eq!(
        parse_challenges(r#"Basic realm="Registry Realm""#),
        vec![Challenge::Basic]
    );
    let got = parse_challenges(r#"Basic realm="x", Bearer realm="https://a/t",service="s""#);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], Challenge::Basic);
}

#[test]
fn malformed_challenges_yield_nothing_and_never_panic() {
    for bad in [
        "",
        "Bearer",
        "Bearer service=\"x\"",
        "Bearer realm=\"unterminated",
        "=====",
        ",,,",
        "Bearer realm=",
        "\u{0}\u{1}",
        "Negotiate abc",
    ] {
        let got = parse_challenges(bad);
        assert!(
            got.iter()
                .all(|c| matches!(c, Challenge::Bearer { .. } | Challenge::Basic)),
            "{bad:?}"
        );
    }
    assert!(parse_challenges("Bearer service=\"x\"").is_empty());
}

#[test]
fn token_response_forms() {
    let t = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
    assert_eq!(t.token.expose(), "abc");
    assert_eq!(t.expires_in, Duration::from_secs(300));
    let t = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
    assert_eq!(t.token.expose(), "xyz");
    assert_eq!(t.expires_in, Duration::from_secs(60), "spec default");
    assert!(parse_token_response(br#"{"token":""}"#).is_err());
    assert!(parse_token_response(b"<html>").is_err());
}

#[test]
fn tokens_are_reused_until_shortly_before_expiry() {
    assert_eq!(usable_for(Duration::from_secs(60)), Duration::from_secs(54));
    assert_eq!(usable_for(Duration::from_secs(2)), Duration::from_secs(1));
    assert_eq!(
        usable_for(Duration::from_secs(3600)),
        Duration::from_secs(3570)
    );
    let cache = TokenCache::default();
    cache.put(
        "repository:a:pull",
        "default",
        Secret::new("t1"),
        Duration::from_secs(60),
    );
    assert_eq!(
        cache.get("repository:a:pull", "default").unwrap().expose(),
        "t1"
    );
    assert!(cache.get("repository:a:pull", "other").is_none());
    assert!(cache.get("repository:b:pull", "default").is_none());
    cache.put(
        "repository:c:pull",
        "default",
        Secret::new("t2"),
        Duration::from_secs(1),
    );
    assert!(
        cache.get("repository:c:pull", "default").is_none(),
        "1 s token is never reused"
    );
    cache.forget("repository:a:pull", "default");
    assert!(cache.get("repository:a:pull", "default").is_none());
}

#[test]
fn realm_trust_follows_the_registrable_domain() {
    let url = |s: &str| url::Url::parse(s).unwrap();
    let ok = |up: &str, realm: &str| realm_may_receive_credentials(up, true, &url(realm), &[]);
    assert!(ok("registry-1.docker.io", "https://auth.docker.io/token"));
    assert!(ok("ghcr.io", "https://ghcr.io/token"));
    assert!(ok("127.0.0.1", "https://127.0.0.1:8443/token"));
    assert!(!ok("registry-1.docker.io", "https://evil.example/token"));
    assert!(
        !ok("registry-1.docker.io", "http://auth.docker.io/token"),
        "no downgrade"
    );
    assert!(!ok("127.0.0.1", "https://localhost/token"));
    assert!(
        !ok("foo.github.io", "https://bar.github.io/token"),
        "public suffix"
    );
    assert!(realm_may_receive_credentials(
        "registry.example.com",
        true,
        &url("https://login.other.net/token"),
        &["login.other.net".to_string()]
    ));
}

#[test]
fn challenge_actions_are_taken_only_for_the_repository_and_known_actions() {
    let challenge = |scope: Option<&str>| Challenge::Bearer {
        realm: "https://auth.example/token".into(),
        service: None,
        scope: scope.map(str::to_owned),
        error: Some("insufficient_scope".into()),
    };
    let cases = [
        (Some("repository:team/app:delete"), Some("delete")),
        (Some("repository:team/app:*"), Some("*")),
        (
            Some("repository:team/app:pull,push,delete"),
            Some("pull,push,delete"),
        ),
        (
            Some("repository:other:pull repository:team/app:delete"),
            Some("delete"),
        ),
        (Some("repository:other/app:delete"), None),
        (Some("repository:team/app:admin"), None),
        (Some("repository:team/app:"), None),
        (Some("registry:catalog:*"), None),
        (None, None),
    ];
    for (scope, want) in cases {
        assert_eq!(
            challenge_actions(&challenge(scope), "team/app").as_deref(),
            want,
            "{scope:?}"
        );
    }
    assert_eq!(challenge_actions(&Challenge::Basic, "team/app"), None);
}
