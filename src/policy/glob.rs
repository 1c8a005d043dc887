//! Repository globs of `repositories` and `deny_repositories` (issue 5, item 4).
//!
//! Owns: what a glob means. `config/validate/values.rs` (`parse_glob`) owns the syntax: OCI
//! name characters plus `*`, no empty path components, no `***`. Must never: allocate per match
//! in a way that grows with the input, or backtrack exponentially (`*a*a*a*b`).
//!
//! Meaning, matched against the whole repository name (after `library/` normalisation):
//!
//! | glob | matches |
//! | --- | --- |
//! | `*` inside a component | any run of characters except `/`: `team-*` matches `team-a` |
//! | `**` as a whole component | zero or more whole components: `team-a/**` matches `team-a`, `team-a/x`, `team-a/x/y`; `**/nginx` matches `nginx` and `a/b/nginx`; `a/**/b` matches `a/b` and `a/x/y/b` |
//! | `**` inside a component | any run of characters including `/`: `foo**` matches `foo`, `foobar`, `foo-x/y` |
//! | `**` alone | every repository |
//! | anything else | itself, exactly (names and globs are lowercase) |
//!
//! `team-a/**` also matching the repository `team-a` itself is deliberate: in an allow list it
//! grants the namespace's own root name, and in a deny list it leaves no way around the rule.
//!
//! Matching is a dynamic programme over (glob token, name position): O(tokens x len^2) in the
//! worst case, with a fixed stack buffer (names are at most 255 bytes).

use crate::oci::name::MAX_NAME_LEN;

/// Does `glob` match the repository name `name`? Names longer than [`MAX_NAME_LEN`] (which no
/// `Repository` is) match nothing.
pub fn matches(glob: &str, name: &str) -> bool {
    let name = name.as_bytes();
    let n = name.len();
    if n > MAX_NAME_LEN {
        return false;
    }
    // reach[i]: the tokens so far can consume exactly name[..i].
    let mut reach = [false; MAX_NAME_LEN + 1];
    reach[0] = true;
    let mut any = true;
    for token in tokens(glob) {
        let mut next = [false; MAX_NAME_LEN + 1];
        for i in (0..=n).filter(|&i| reach[i]) {
            token.step(name, i, &mut next[..=n]);
        }
        reach = next;
        any = reach[..=n].iter().any(|&r| r);
        if !any {
            break;
        }
    }
    any && reach[n]
}

/// One step of a glob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'g> {
    /// These bytes exactly.
    Lit(&'g [u8]),
    /// `*`: `[^/]*`.
    Star,
    /// `**` inside a component, or the whole glob: `.*`.
    Any,
    /// Leading `**/`: nothing, or components each followed by `/`: `(.*/)?`.
    LeadDirs,
    /// `/**/` between components: `/` or `/` components `/`: `/(.*/)?`.
    MidDirs,
    /// Trailing `/**`: nothing, or `/` and more: `(/.*)?`.
    TrailDirs,
}

impl Token<'_> {
    /// Marks in `next` every end position of a match of this token starting at `i`.
    fn step(self, name: &[u8], i: usize, next: &mut [bool]) {
        let n = name.len();
        match self {
            Token::Lit(lit) => {
                if name[i..].starts_with(lit) {
                    next[i + lit.len()] = true;
                }
            }
            Token::Star => {
                next[i] = true;
                let mut j = i;
                while j < n && name[j] != b'/' {
                    j += 1;
                    next[j] = true;
                }
            }
            Token::Any => next[i..].fill(true),
            Token::LeadDirs => {
                next[i] = true;
                mark_after_slashes(name, i, next);
            }
            Token::MidDirs => {
                if i < n && name[i] == b'/' {
                    mark_after_slashes(name, i, next);
                }
            }
            Token::TrailDirs => {
                next[i] = true;
                if i < n && name[i] == b'/' {
                    next[i + 1..].fill(true);
                }
            }
        }
    }
}

/// Marks `next[k + 1]` for every `/` at `name[k]`, `k >= from`: the ends of `.../`.
fn mark_after_slashes(name: &[u8], from: usize, next: &mut [bool]) {
    for (k, &b) in name.iter().enumerate().skip(from) {
        if b == b'/' {
            next[k + 1] = true;
        }
    }
}

/// The glob as tokens. Consecutive `**` components count as one.
fn tokens(glob: &str) -> Vec<Token<'_>> {
    let comps: Vec<&str> = glob.split('/').collect();
    let last = comps.len() - 1;
    let mut out = Vec::with_capacity(comps.len() * 2);
    let mut prev_deep = false;
    for (i, comp) in comps.iter().enumerate() {
        if *comp == "**" {
            if prev_deep {
                continue;
            }
            prev_deep = true;
            out.push(if last == 0 {
                Token::Any
            } else if i == 0 {
                Token::LeadDirs
            } else if i == last {
                Token::TrailDirs
            } else {
                Token::MidDirs
            });
            continue;
        }
        if i > 0 && !prev_deep {
            out.push(Token::Lit(b"/"));
        }
        prev_deep = false;
        component_tokens(comp.as_bytes(), &mut out);
    }
    // A run of `**` components at the end was collapsed into its first one: `a/**/**` is
    // trailing, not middle, and `**/**` is everything.
    match out.last_mut() {
        Some(t @ Token::MidDirs) => *t = Token::TrailDirs,
        Some(t @ Token::LeadDirs) => *t = Token::Any,
        _ => {}
    }
    out
}

/// `*`, `**` and literal runs inside one component.
fn component_tokens<'g>(comp: &'g [u8], out: &mut Vec<Token<'g>>) {
    let mut i = 0;
    while i < comp.len() {
        if comp[i] == b'*' {
            let stars = comp[i..].iter().take_while(|&&b| b == b'*').count();
            out.push(if stars >= 2 { Token::Any } else { Token::Star });
            i += stars;
        } else {
            let len = comp[i..].iter().take_while(|&&b| b != b'*').count();
            out.push(Token::Lit(&comp[i..i + len]));
            i += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(glob: &str, yes: &[&str], no: &[&str]) {
        for name in yes {
            assert!(matches(glob, name), "{glob:?} should match {name:?}");
        }
        for name in no {
            assert!(!matches(glob, name), "{glob:?} should not match {name:?}");
        }
    }

    #[test]
    fn literal() {
        check(
            "library/alpine",
            &["library/alpine"],
            &["library/alpine2", "library", "alpine", "x/library/alpine"],
        );
    }

    #[test]
    fn star_stays_in_one_component() {
        check("*", &["alpine", "a"], &["library/alpine"]);
        check(
            "library/*",
            &["library/alpine", "library/a-b.c"],
            &["library", "library/a/b", "librarything/a"],
        );
        check(
            "team-*/app",
            &["team-a/app", "team-/app"],
            &["team-a/b/app", "team/app", "team-a/app2"],
        );
        check(
            "*-prod",
            &["api-prod", "-prod"],
            &["api-prod/x", "a/api-prod"],
        );
        check("*x*", &["x", "axb", "abx"], &["ab", "a/x", "x/a"]);
        check("a*b*c", &["abc", "aXbYc", "abbc"], &["ab", "a/b/c", "acb"]);
    }

    #[test]
    fn double_star_as_component() {
        check(
            "team-a/**",
            &["team-a", "team-a/x", "team-a/x/y/z"],
            &["team-ab", "team-a-x", "team-b/x", "x/team-a"],
        );
        check(
            "**/nginx",
            &["nginx", "library/nginx", "a/b/c/nginx"],
            &["nginx2", "library/nginx/x", "library/xnginx"],
        );
        check(
            "a/**/b",
            &["a/b", "a/x/b", "a/x/y/b"],
            &["a", "b", "a/bb", "ab", "a/x/y", "x/a/b"],
        );
        check("**", &["a", "a/b", "a/b/c"], &[]);
        check("a/**/**/b", &["a/b", "a/x/b"], &["a/x"]);
        check("a/**/**", &["a", "a/x", "a/x/y"], &["b"]);
        check("**/**", &["a", "a/b"], &[]);
        check(
            "**/a/**",
            &["a", "x/a", "a/x", "x/a/y"],
            &["xa", "ax", "x/y"],
        );
    }

    #[test]
    fn double_star_inside_a_component_crosses_slashes() {
        check(
            "foo**",
            &["foo", "foobar", "foo/bar", "foo-x/y/z"],
            &["fo", "xfoo", "x/foo"],
        );
        check("a**z", &["az", "a/b/z", "abz"], &["a/b", "za"]);
        check("x/**y", &["x/y", "x/ay", "x/a/b/y"], &["x", "y", "x/a/b"]);
    }

    #[test]
    fn whole_name_only() {
        check("alp", &["alp"], &["alpine", "xalp"]);
        check("a/b", &["a/b"], &["a/b/c", "c/a/b"]);
    }

    #[test]
    fn pathological_globs_finish() {
        let glob = "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
        let name = "a".repeat(255);
        assert!(!matches(glob, &name));
        let deep = "**a**a**a**a**a**a**a**a**a**a**b";
        let name = ["a"; 127].join("/");
        assert!(!matches(deep, &name));
        assert!(matches("**", &name));
    }

    #[test]
    fn over_long_names_match_nothing() {
        assert!(!matches("**", &"a".repeat(MAX_NAME_LEN + 1)));
        assert!(matches("**", &"a".repeat(MAX_NAME_LEN)));
    }

    /// Reference semantics for globs without `**` inside a component, by plain recursion.
    fn reference(glob: &[&str], name: &[&str]) -> bool {
        fn component(p: &[u8], s: &[u8]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some((b'*', rest)) => (0..=s.len()).any(|k| component(rest, &s[k..])),
                Some((c, rest)) => s.first() == Some(c) && component(rest, &s[1..]),
            }
        }
        match glob.split_first() {
            None => name.is_empty(),
            Some((&"**", rest)) => (0..=name.len()).any(|k| reference(rest, &name[k..])),
            Some((p, rest)) => {
                !name.is_empty()
                    && component(p.as_bytes(), name[0].as_bytes())
                    && reference(rest, &name[1..])
            }
        }
    }

    #[test]
    fn agrees_with_reference_semantics() {
        let mut state = 0x853c_49e6_748f_ea9bu64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as usize
        };
        let glob_parts = ["**", "*", "a", "b", "a*", "*b", "a*b", "ab"];
        let name_parts = ["a", "b", "ab", "ba", "aab", "abb"];
        for _ in 0..20_000 {
            let glob: Vec<&str> = (0..1 + next(4)).map(|_| glob_parts[next(8)]).collect();
            let name: Vec<&str> = (0..1 + next(4)).map(|_| name_parts[next(6)]).collect();
            let (g, n) = (glob.join("/"), name.join("/"));
            assert_eq!(matches(&g, &n), reference(&glob, &name), "{g:?} vs {n:?}");
        }
    }

    #[test]
    fn tokens_of_component_forms() {
        use Token::*;
        assert_eq!(tokens("a/**"), [Lit(b"a"), TrailDirs]);
        assert_eq!(tokens("**/a"), [LeadDirs, Lit(b"a")]);
        assert_eq!(tokens("a/**/b"), [Lit(b"a"), MidDirs, Lit(b"b")]);
        assert_eq!(tokens("**"), [Any]);
        assert_eq!(
            tokens("a*b**c"),
            [Lit(b"a"), Star, Lit(b"b"), Any, Lit(b"c")]
        );
        assert_eq!(tokens("a/b"), [Lit(b"a"), Lit(b"/"), Lit(b"b")]);
    }
}
