use std::path::Path;

use crate::*;

const EXAMPLE: &str = include_str!("../../examples/rules.yaml");

fn features(prompt: u64, max: u64, mods: &[Modality]) -> RequestFeatures {
    RequestFeatures {
        model: "smollm2".into(),
        prompt_tokens: prompt,
        max_tokens: max,
        modalities: mods.iter().copied().collect(),
        endpoint: Some(Endpoint::ChatCompletions),
        ..Default::default()
    }
}

fn targets(d: &RouteDecision) -> Vec<&str> {
    d.targets.iter().map(|t| &**t).collect()
}

#[test]
fn example_routes_by_context_and_modality() {
    let rules = compile(EXAMPLE, Path::new("examples")).unwrap();
    let d = rules.route(&features(10, 100, &[Modality::Text]));
    assert_eq!((&*d.rule, targets(&d)), ("light", vec!["cpu"]));
    // boundary: exactly 1024 is light, 1025 is chat
    let d = rules.route(&features(1000, 24, &[Modality::Text]));
    assert_eq!(&*d.rule, "light");
    let d = rules.route(&features(1000, 25, &[Modality::Text]));
    assert_eq!(
        (&*d.rule, targets(&d)),
        ("chat", vec!["l40s-spot", "l40s-ondemand"])
    );
    let d = rules.route(&features(5000, 256, &[Modality::Text]));
    assert_eq!(
        (&*d.rule, targets(&d)),
        ("long-context", vec!["h100-spot", "h100-ondemand"])
    );
    // fallback_on_demand expands the spot pool
    let d = rules.route(&features(10, 10, &[Modality::Text, Modality::Image]));
    assert_eq!(
        (&*d.rule, targets(&d)),
        ("multimodal", vec!["h100-spot", "h100-ondemand"])
    );
    assert_eq!(d.matched, vec!["modality.any_of"]);
    assert_eq!(rules.context_cuts(), &[1025, 4097]);
    assert_eq!(
        rules.model("smollm2").unwrap().tokenizer,
        TokenizerRef::Gguf(Path::new("examples").join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    );
}

#[test]
fn needs_exact_only_when_a_cut_is_inside_the_bounds() {
    let cuts = [1025, 4097];
    assert!(!CompiledRules::needs_exact(&cuts, 10, 900));
    assert!(CompiledRules::needs_exact(&cuts, 1000, 1025));
    assert!(!CompiledRules::needs_exact(&cuts, 1025, 4096));
    assert!(CompiledRules::needs_exact(&cuts, 1024, 5000));
}

fn problems(yaml: &str) -> Vec<String> {
    match compile(yaml, Path::new(".")) {
        Ok(_) => panic!("expected the file to be rejected"),
        Err(e) => e.problems().iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn every_problem_is_reported_with_path_and_line() {
    let yaml = r#"version: 1
pools:
  a: { class: cpu, capacity: spot, cost_per_hour: -1 }
rules:
  - name: r1
    when: { context_tokens: { at_least: 500, at_most: 100 } }
    route: [nope]
  - name: r1
    route: []
"#;
    let p = problems(yaml);
    let expect = [
        "pools.a.cost_per_hour (line 3",
        "rules[0].when.context_tokens (line 6",
        "impossible range: at_least 500 > at_most 100",
        "rules[0].route[0] (line 7",
        "unknown pool `nope`",
        "rules[1].name (line 8",
        "duplicate rule name `r1`",
        "rules[1].route (line 9",
        "empty route",
    ];
    let all = p.join("\n");
    for e in expect {
        assert!(all.contains(e), "missing `{e}` in:\n{all}");
    }
}

#[test]
fn unknown_keys_are_rejected_with_location() {
    let yaml = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1, colour: red }\nrules:\n  - name: all\n    route: [a]\n";
    let p = problems(yaml).join("\n");
    assert!(p.contains("colour"), "{p}");
    assert!(p.contains("line 3"), "{p}");
}

#[test]
fn shadowed_rules_and_missing_default_are_reported() {
    let yaml = r#"version: 1
pools:
  a: { class: cpu, capacity: on_demand, cost_per_hour: 1 }
rules:
  - name: wide
    when: { context_tokens: { at_most: 4096 } }
    route: [a]
  - name: narrow
    when: { context_tokens: { at_least: 10, at_most: 1000 }, stream: true }
    route: [a]
  - name: images
    when: { modality: { any_of: [image] } }
    route: [a]
"#;
    let p = problems(yaml).join("\n");
    assert!(
        p.contains("rule `narrow` can never match: rule `wide`"),
        "{p}"
    );
    assert!(!p.contains("rule `images` can never match"), "{p}");
    assert!(p.contains("no default route"), "{p}");
}

#[test]
fn anchors_and_aliases_are_refused() {
    let yaml = "version: 1\npools:\n  a: &p { class: cpu, capacity: spot, cost_per_hour: 1 }\n  b: *p\nrules:\n  - name: all\n    route: [a]\n";
    let p = problems(yaml).join("\n");
    assert!(p.contains("anchors and aliases"), "{p}");
    // '*' inside a quoted glob is fine
    let ok = "version: 1\nmodels: {}\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1 }\nrules:\n  - name: all\n    when: { model: [\"*\"] }\n    route: [a]\ndefault: { route: [a] }\n";
    compile(ok, Path::new(".")).unwrap();
}

#[test]
fn models_of_a_pool_without_static_workers_are_refused() {
    let yaml = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1, models: [m] }\n  b: { class: cpu, capacity: spot, cost_per_hour: 1, workers: [\"h:1\"], models: [m] }\nrules: []\ndefault: { route: [a] }\n";
    let p = problems(yaml);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("pools.a.models"), "{p:?}");
}

#[test]
fn fallback_without_on_demand_pool_is_an_error() {
    let yaml = "version: 1\npools:\n  s: { class: l40s, capacity: spot, cost_per_hour: 1 }\nrules:\n  - name: all\n    route: [s]\n    fallback_on_demand: true\n";
    let p = problems(yaml).join("\n");
    assert!(p.contains("no on_demand pool of class `l40s`"), "{p}");
}

#[test]
fn store_keeps_last_good_rules_on_a_bad_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    let good = "version: 1\npools:\n  a: { class: cpu, capacity: on_demand, cost_per_hour: 1 }\n  b: { class: cpu, capacity: on_demand, cost_per_hour: 1 }\nrules:\n  - name: all\n    route: [a]\n";
    std::fs::write(&path, good).unwrap();
    let store = RulesStore::open(&path).unwrap();
    assert_eq!(store.generation(), 1);
    std::fs::write(
        &path,
        "version: 1\npools: {}\nrules: [{ name: x, route: [zz] }]\n",
    )
    .unwrap();
    let err = store.reload().unwrap_err().to_string();
    assert!(err.contains("unknown pool `zz`"), "{err}");
    assert_eq!(store.generation(), 1);
    let d = store.load().rules.route(&features(1, 1, &[]));
    assert_eq!(targets(&d), vec!["a"]);
    std::fs::write(&path, good.replace("route: [a]", "route: [b]")).unwrap();
    assert!(matches!(store.reload().unwrap(), ReloadOutcome::Applied(2)));
    let d = store.load().rules.route(&features(1, 1, &[]));
    assert_eq!(targets(&d), vec!["b"]);
}

/// Golden files: `tests/fixtures/invalid/X.yaml` must be rejected with exactly the problems
/// in `X.expected`. `BLESS=1 cargo test -p routing-rules` rewrites the expectations.
#[test]
fn invalid_fixtures_give_their_exact_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let got = match compile_file(&path) {
            Ok(_) => panic!("{} compiled but must not", path.display()),
            Err(e) => e
                .problems()
                .iter()
                .map(|p| format!("{p}\n"))
                .collect::<String>(),
        };
        let expected_path = path.with_extension("expected");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&expected_path, &got).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        assert_eq!(got, expected, "{}", path.display());
    }
    assert!(n >= 6, "fixtures missing");
}

/// Adversarial inputs (deep nesting, alias bombs, NaN, duplicate keys, binary, several
/// documents): every one is answered with `Ok` or an error, never a panic or a hang.
#[test]
fn corpus_of_hostile_files_never_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        n += 1;
        let t0 = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(|| compile_file(&path).map(|_| ()));
        assert!(outcome.is_ok(), "{} panicked", path.display());
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(2),
            "{} took {:?}",
            path.display(),
            t0.elapsed()
        );
    }
    assert!(n >= 10);
    // the specific verdicts that matter
    let bad = |f: &str| {
        compile_file(&dir.join(f))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    assert!(bad("billion-laughs.yaml").contains("anchors and aliases"));
    assert!(bad("nan-price.yaml").contains("cost_per_hour"));
    assert!(
        bad("duplicate-key.yaml")
            .to_lowercase()
            .contains("duplicate")
    );
    assert!(bad("bad-names.yaml").contains("rule name is empty"));
}

/// Matching is total and deterministic: over many random requests every decision names a
/// rule and pools of the file, the same request always gets the same decision, and the rule
/// is the one the file's order dictates (checked against the rules written out by hand).
#[test]
fn matching_is_total_and_deterministic() {
    use rand::{RngExt, SeedableRng};
    let rules = compile(EXAMPLE, Path::new("examples")).unwrap();
    let pools: Vec<&str> = rules.pools().iter().map(|p| &*p.name).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let all = [Modality::Text, Modality::Image, Modality::Audio];
    for _ in 0..20_000 {
        let mods: Vec<Modality> = all
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.4))
            .collect();
        let f = RequestFeatures {
            model: if rng.random_bool(0.5) {
                "smollm2".into()
            } else {
                "other".into()
            },
            prompt_tokens: rng.random_range(0..20_000),
            max_tokens: rng.random_range(0..8_000),
            modalities: mods.iter().copied().collect(),
            stream: rng.random_bool(0.5),
            endpoint: Some(Endpoint::ChatCompletions),
            ..Default::default()
        };
        let d = rules.route(&f);
        assert!(!d.targets.is_empty());
        assert!(d.targets.iter().all(|t| pools.contains(&&**t)));
        let again = rules.route(&f);
        assert_eq!(
            (d.rule.clone(), targets(&d)),
            (again.rule.clone(), targets(&again))
        );
        let multimodal = mods.contains(&Modality::Image) || mods.contains(&Modality::Audio);
        let expected = if multimodal {
            "multimodal"
        } else if f.context_tokens() <= 1024 {
            "light"
        } else if f.context_tokens() <= 4096 {
            "chat"
        } else {
            "long-context"
        };
        assert_eq!(&*d.rule, expected, "{f:?}");
    }
}

#[test]
fn retry_policy_try_new_is_the_one_check() {
    let d = RetryPolicy::default();
    let ok = RetryPolicy::try_new(
        d.max_attempts,
        d.budget_ratio,
        d.budget_floor,
        d.on.clone(),
        d.backoff,
    );
    assert_eq!(ok, Ok(d.clone()));
    let fields = |n: u32, ratio: f64, backoff_ms: u64| {
        let r = RetryPolicy::try_new(
            n,
            ratio,
            0,
            vec![],
            std::time::Duration::from_millis(backoff_ms),
        );
        r.map(|_| Vec::new())
            .unwrap_or_else(|e| e.problems.iter().map(ToString::to_string).collect())
    };
    assert_eq!(fields(0, 0.5, 0), ["max_attempts: must be 1..=10, got 0"]);
    assert_eq!(fields(11, 0.5, 0), ["max_attempts: must be 1..=10, got 11"]);
    assert_eq!(
        fields(1, -0.1, 0),
        ["budget_ratio: must be within 0..=1, got -0.1"]
    );
    assert_eq!(
        fields(1, f64::NAN, 0),
        ["budget_ratio: must be within 0..=1, got NaN"]
    );
    assert_eq!(
        fields(1, f64::INFINITY, 0),
        ["budget_ratio: must be within 0..=1, got inf"]
    );
    assert_eq!(
        fields(1, 1.0, 10_001),
        ["backoff_ms: must be at most 10000, got 10001"]
    );
    assert_eq!(fields(10, 0.0, 10_000), Vec::<String>::new());
    assert_eq!(fields(0, 2.0, 0).len(), 2);
}

/// A bad file-level `retry` is reported once, at its own path, not again by every rule
/// that inherits it; a rule's own bad value is reported at the rule.
#[test]
fn retry_problems_are_reported_where_they_are_written() {
    let yaml = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1 }\nretry: { max_attempts: 0 }\nrules:\n  - name: x\n    when: { stream: true }\n    route: [a]\n    retry: { on: [connect] }\n  - name: y\n    route: [a]\n    retry: { budget_ratio: .inf }\n";
    let p = problems(yaml);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].starts_with("retry.max_attempts (line 4"), "{p:?}");
    assert!(p[0].ends_with("must be 1..=10, got 0"), "{p:?}");
    assert!(p[1].starts_with("rules[1].retry.budget_ratio"), "{p:?}");
    assert!(p[1].ends_with("must be within 0..=1, got inf"), "{p:?}");
}

#[test]
fn a_file_over_the_limit_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    let mut text = EXAMPLE.to_string();
    while text.len() as u64 <= MAX_FILE_BYTES {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&path, &text).unwrap();
    match compile_file(&path) {
        Err(RulesError::TooLarge { size, limit }) => {
            assert_eq!((size, limit), (text.len() as u64, MAX_FILE_BYTES));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(matches!(
        RulesStore::open(&path),
        Err(RulesError::TooLarge { .. })
    ));
    // exactly at the limit is read and compiled
    text.truncate(MAX_FILE_BYTES as usize);
    let cut = text.rfind('\n').unwrap() + 1;
    text.truncate(cut);
    text.push_str(&"#".repeat(MAX_FILE_BYTES as usize - cut - 1));
    text.push('\n');
    std::fs::write(&path, &text).unwrap();
    assert_eq!(text.len() as u64, MAX_FILE_BYTES);
    compile_file(&path).unwrap();
}

/// A file whose length says nothing (a device, a FIFO) is read only up to the limit.
#[cfg(unix)]
#[test]
fn an_endless_file_is_read_only_up_to_the_limit() {
    match compile_file(Path::new("/dev/zero")) {
        Err(RulesError::TooLarge { size, limit }) => {
            assert_eq!((size, limit), (MAX_FILE_BYTES + 1, MAX_FILE_BYTES));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// The anchor pre-scan is one pass: long lines full of `*` and long scalars get the right
/// verdict (timing is measured separately, not asserted).
#[test]
fn anchor_scan_handles_long_lines() {
    let pools = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1 }\n";
    // 200 KB of `*` is no anchor token (the next character is not a name), and no YAML
    // mapping either: the parser refuses it.
    let stars = format!(
        "{pools}{}\ndefault: {{ route: [a] }}\n",
        "*".repeat(200_000)
    );
    let p = problems(&stars).join("\n");
    assert!(!p.contains("anchors and aliases"), "{p}");
    assert!(p.contains("line 4"), "{p}");
    // A 150 KB scalar with a `*` every other character, plain and quoted, is a name.
    for name in ["a*".repeat(75_000), format!("\"{}\"", "*".repeat(150_000))] {
        let yaml = format!("{pools}rules:\n  - name: {name}\n    route: [a]\n");
        let rules = compile(&yaml, Path::new(".")).unwrap();
        assert_eq!(rules.rules()[0].name.len(), 150_000);
    }
    // An alias at the end of a long line of multi-byte text is found, at its column in
    // characters.
    let yaml = format!(
        "{pools}rules:\n  - name: x\n    route: [a]\n# {}\n  - {} *p\n",
        "é",
        "é".repeat(100_000)
    );
    let p = problems(&yaml).join("\n");
    assert!(p.contains("(line 8, column 100006)"), "{p}");
    assert!(p.contains("anchors and aliases"), "{p}");
}

#[test]
fn tenants_compile_to_key_digests_and_every_problem_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.key"), "key-from-file\n").unwrap();
    let digest_hex: String = key_digest("key-a")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let yaml = format!(
        r#"version: 1
auth: required
pools: {{ cpu: {{ class: cpu, capacity: on_demand, cost_per_hour: 0.2 }} }}
tenants:
  team-a:
    keys: [{{ sha256: "{digest_hex}" }}]
    limits: {{ requests_per_minute: 60, tokens_per_minute: 10000, max_concurrent: 4 }}
  team-b:
    keys: [{{ file: b.key }}]
rules:
  - name: critical
    when: {{ tenant: [team-b, key-0011223344556677] }}
    route: [cpu]
  - name: all
    route: [cpu]
"#
    );
    let rules = compile(&yaml, dir.path()).unwrap();
    assert_eq!(rules.auth(), Auth::Required);
    let a = rules.tenant_by_key(&key_digest("key-a")).unwrap();
    assert_eq!(&*a.name, "team-a");
    assert_eq!(a.limits.requests_per_minute.map(|n| n.get()), Some(60));
    assert_eq!(a.limits.max_concurrent.map(|n| n.get()), Some(4));
    assert_eq!(
        &*rules
            .tenant_by_key(&key_digest("key-from-file"))
            .unwrap()
            .name,
        "team-b"
    );
    assert!(rules.tenant_by_key(&key_digest("key-b")).is_none());

    let bad = r#"version: 1
auth: required
pools: { cpu: { class: cpu, capacity: on_demand, cost_per_hour: 0.2 } }
tenants:
  team-a:
    keys: [{ sha256: "abc" }, { env: SWITCHYARD_TEST_SURELY_UNSET }, { file: missing.key }]
    limits: { requests_per_minute: 0, budget_usd_per_day: 0, budget_usd_per_month: -1 }
  anonymous:
    keys: [{ sha256: "0000000000000000000000000000000000000000000000000000000000000000" }]
  team-c:
    keys: [{ sha256: "0000000000000000000000000000000000000000000000000000000000000000" }]
rules:
  - name: x
    when: { tenant: [nobody] }
    route: [cpu]
  - name: all
    route: [cpu]
"#;
    let p = problems(bad).join("\n");
    for (path, message) in [
        (
            "tenants.team-a.keys[0] (line",
            "sha256 must be 64 hex digits",
        ),
        (
            "tenants.team-a.keys[1] (line",
            "environment variable `SWITCHYARD_TEST_SURELY_UNSET` is not set",
        ),
        ("tenants.team-a.keys[2] (line", "cannot read key file"),
        (
            "tenants.team-a.limits.requests_per_minute (line",
            "must be at least 1",
        ),
        (
            "tenants.team-a.limits.budget_usd_per_day (line",
            "must be a positive number of dollars",
        ),
        (
            "tenants.team-a.limits.budget_usd_per_month (line",
            "must be a positive number of dollars",
        ),
        (
            "tenants.anonymous (line",
            "are not `anonymous`, `other` or `key-…`",
        ),
        (
            "tenants.team-c.keys[0] (line",
            "this key is also tenant `anonymous`'s",
        ),
        ("rules[0].when.tenant (line", "unknown tenant `nobody`"),
    ] {
        assert!(
            p.lines()
                .any(|l| l.starts_with(path) && l.contains(message)),
            "missing {path} {message:?} in:\n{p}"
        );
    }
    let none = "version: 1\nauth: required\npools: { cpu: { class: cpu, capacity: on_demand, cost_per_hour: 0.2 } }\nrules: [{ name: all, route: [cpu] }]\n";
    assert!(
        problems(none)
            .join("\n")
            .contains("`auth: required` with no tenants")
    );
}

#[test]
fn a_tenants_pools_cut_its_routes_and_its_models_and_pools_must_exist() {
    let digest = |k: &str| -> String { key_digest(k).iter().map(|b| format!("{b:02x}")).collect() };
    let yaml = format!(
        r#"version: 1
pools:
  spot:     {{ class: l40s, capacity: spot,      cost_per_hour: 0.8 }}
  ondemand: {{ class: l40s, capacity: on_demand, cost_per_hour: 1.9 }}
  cpu:      {{ class: cpu,  capacity: on_demand, cost_per_hour: 0.2 }}
tenants:
  critical:
    keys: [{{ sha256: "{}" }}]
    pools: [ondemand]
  anyone:
    keys: [{{ sha256: "{}" }}]
rules:
  - name: light
    when: {{ context_tokens: {{ at_most: 100 }} }}
    route: [cpu]
  - name: rest
    route: [spot, ondemand]
"#,
        digest("k1"),
        digest("k2"),
    );
    let rules = compile(&yaml, Path::new(".")).unwrap();
    let mut f = features(500, 10, &[Modality::Text]);
    assert_eq!(targets(&rules.route(&f)), ["spot", "ondemand"]);
    f.tenant = Some("critical".into());
    assert_eq!(targets(&rules.route(&f)), ["ondemand"], "never on spot");
    f.prompt_tokens = 10;
    let d = rules.route(&f);
    assert_eq!(
        (&*d.rule, targets(&d).len()),
        ("light", 0),
        "cpu is not its pool"
    );
    f.tenant = Some("anyone".into());
    assert_eq!(targets(&rules.route(&f)), ["cpu"]);
    assert!(rules.tenant("anyone").unwrap().allows_model("whatever"));

    let bad = yaml.replace(
        "    pools: [ondemand]",
        "    pools: [ondemand, gpu9]\n    models: [nope]",
    );
    let p = problems(&bad).join("\n");
    assert!(
        p.contains("tenants.critical.pools[1]") && p.contains("unknown pool `gpu9`"),
        "{p}"
    );
    assert!(
        p.contains("tenants.critical.models[0]") && p.contains("unknown model `nope`"),
        "{p}"
    );
}

/// A Kubernetes ConfigMap volume, updated exactly as the kubelet's atomic writer does it:
/// the data lives in a `..<timestamp>` directory, `..data` links to it and `rules.yaml`
/// links to `..data/rules.yaml`; an update writes a new timestamped directory, points a
/// `..data_tmp` link at it, renames that over `..data` and removes the old directory. The
/// file the router opened never changes in place. The watcher (with its poll backstop set
/// to a minute, so only the directory events can be what it sees) picks the swap up; a
/// broken update is refused and the last good rules keep serving.
#[cfg(unix)]
#[test]
fn a_configmap_volume_swap_is_picked_up_and_a_broken_one_refused() {
    use std::os::unix::fs::symlink;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path();
    let rules = |route: &str| {
        format!(
            "version: 1\npools:\n  a: {{ class: cpu, capacity: on_demand, cost_per_hour: 1 }}\n  b: {{ class: cpu, capacity: on_demand, cost_per_hour: 1 }}\nrules:\n  - name: all\n    route: [{route}]\n"
        )
    };
    // the kubelet's layout for the first version
    let write_version = |n: u32, text: &str| -> String {
        let ts = format!("..2026_12_06_23_00_0{n}.{n}{n}{n}");
        std::fs::create_dir(mount.join(&ts)).unwrap();
        std::fs::write(mount.join(&ts).join("rules.yaml"), text).unwrap();
        ts
    };
    let swap_to = |ts: &str| {
        let tmp = mount.join("..data_tmp");
        symlink(ts, &tmp).unwrap();
        std::fs::rename(&tmp, mount.join("..data")).unwrap();
    };
    let first = write_version(1, &rules("a"));
    symlink(&first, mount.join("..data")).unwrap();
    symlink("..data/rules.yaml", mount.join("rules.yaml")).unwrap();

    let store = std::sync::Arc::new(RulesStore::open(mount.join("rules.yaml")).unwrap());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Result<u64, String>>();
    let watcher = store
        .watch(Duration::from_secs(60), stop.clone(), move |r| {
            let _ = tx.send(match r {
                Ok(ReloadOutcome::Applied(g)) => Ok(*g),
                Ok(ReloadOutcome::Unchanged) => Ok(0),
                Err(e) => Err(e.to_string()),
            });
        })
        .unwrap();
    // let the watch settle before the first update
    std::thread::sleep(Duration::from_millis(200));

    let second = write_version(2, &rules("b"));
    swap_to(&second);
    std::fs::remove_dir_all(mount.join(&first)).unwrap();
    let got = rx.recv_timeout(Duration::from_secs(5));
    assert_eq!(got, Ok(Ok(2)), "the ..data swap was not picked up");
    let d = store.load().rules.route(&features(1, 1, &[]));
    assert_eq!(targets(&d), vec!["b"]);

    // a broken update: refused, the last good rules serve on
    let third = write_version(
        3,
        "version: 1\npools: {}\nrules: [{ name: x, route: [zz] }]\n",
    );
    swap_to(&third);
    std::fs::remove_dir_all(mount.join(&second)).unwrap();
    let got = rx.recv_timeout(Duration::from_secs(5));
    assert!(
        matches!(&got, Ok(Err(e)) if e.contains("unknown pool `zz`")),
        "{got:?}"
    );
    assert_eq!(store.generation(), 2);
    let d = store.load().rules.route(&features(1, 1, &[]));
    assert_eq!(targets(&d), vec!["b"]);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(watcher);
}
