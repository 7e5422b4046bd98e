//! The JSON Schema is generated from the spec types; these tests keep the committed copy
//! equal to it and check it against every shipped example and fixture.

use std::path::{Path, PathBuf};

use crate::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `docs/rules.schema.json` (what `JSON_SCHEMA` and editors see) is exactly the generated
/// schema. `UPDATE_SCHEMA=1 cargo test -p routing-rules schema` rewrites it.
#[test]
fn committed_schema_is_the_generated_one() {
    let generated = json_schema();
    let path = root().join("docs/rules.schema.json");
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    assert!(
        JSON_SCHEMA == generated,
        "docs/rules.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test -p routing-rules schema`"
    );
}

fn validator() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(&json_schema()).unwrap();
    jsonschema::draft202012::new(&schema).unwrap()
}

/// The YAML document as JSON, as an editor's YAML plugin would hand it to the schema:
/// YAML 1.2 Core booleans (`y` and `no` are strings there; the compiler, reading typed
/// fields, also takes a `y` where it wants a string).
fn as_json(yaml: &str) -> serde_json::Value {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    serde_saphyr::from_str_with_options::<serde_json::Value>(yaml, options).unwrap()
}

fn schema_errors(v: &jsonschema::Validator, yaml: &str) -> Vec<String> {
    v.iter_errors(&as_json(yaml))
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn examples_satisfy_the_schema() {
    let v = validator();
    let mut n = 0;
    let listed = |d: &str| {
        std::fs::read_dir(root().join(d))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect::<Vec<_>>()
    };
    // the examples, and the rules files replay compares (examples/replay/)
    for path in [listed("examples"), listed("examples/replay")].concat() {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        n += 1;
        let yaml = std::fs::read_to_string(&path).unwrap();
        // an example may read a secret from its environment, as a deployment does
        // (examples/engines.yaml: vLLM's key); every other problem fails the test
        if let Err(e) = compile_file(&path) {
            let crate::problem::RulesError::Invalid(problems) = &e else {
                panic!("{}: {e}", path.display());
            };
            assert!(
                problems
                    .iter()
                    .all(|p| p.message.starts_with("environment variable")),
                "{}: {e}",
                path.display()
            );
        }
        let errors = schema_errors(&v, &yaml);
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
    }
    assert!(n >= 1, "no examples found");
}

/// What the schema says of each fixture: `Some(true)` valid, `Some(false)` refused,
/// `None` not asked (no single JSON value to give it: aliases, binary, several documents,
/// duplicate keys, NaN, nesting past the parser's depth budget). Files that compile must be valid; files invalid by shape
/// must be refused; files invalid only by meaning (unknown pools, shadowing) pass, as the
/// schema cannot know. Every fixture must be listed, so a new one gets a verdict.
const FIXTURES: &[(&str, Option<bool>)] = &[
    ("corpus/bad-names.yaml", Some(false)),
    ("corpus/billion-laughs.yaml", None),
    ("corpus/binary.yaml", None),
    ("corpus/deep-nesting.yaml", None),
    ("corpus/duplicate-key.yaml", None),
    ("corpus/empty.yaml", Some(false)),
    ("corpus/flow.yaml", Some(true)),
    ("corpus/nan-price.yaml", None),
    ("corpus/two-docs.yaml", None),
    ("corpus/u64-max.yaml", Some(true)),
    ("invalid/alias-bomb.yaml", None),
    ("invalid/impossible-range.yaml", Some(false)),
    ("invalid/retry-out-of-range.yaml", Some(false)),
    ("invalid/shadowed.yaml", Some(true)),
    ("invalid/unknown-key.yaml", Some(false)),
    ("invalid/unknown-pool.yaml", Some(true)),
];

#[test]
fn fixtures_get_the_schema_verdict_they_should() {
    let v = validator();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seen = Vec::new();
    for sub in ["corpus", "invalid"] {
        for entry in std::fs::read_dir(dir.join(sub)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let name = format!("{sub}/{}", path.file_name().unwrap().to_string_lossy());
            let verdict = FIXTURES
                .iter()
                .find(|(f, _)| *f == name)
                .unwrap_or_else(|| panic!("{name} has no schema verdict in FIXTURES"))
                .1;
            seen.push(name.clone());
            let compiles = compile_file(&path).is_ok();
            let Some(valid) = verdict else {
                assert!(!compiles, "{name} compiles, so the schema must be asked");
                continue;
            };
            if compiles {
                assert!(valid, "{name} compiles, so the schema must accept it");
            }
            let yaml = std::fs::read_to_string(&path).unwrap();
            let errors = schema_errors(&v, &yaml);
            assert_eq!(errors.is_empty(), valid, "{name}: {errors:?}");
        }
    }
    assert_eq!(seen.len(), FIXTURES.len(), "a listed fixture is missing");
}

/// Spot checks of what the schema expresses, each with a file the compiler refuses too.
#[test]
fn schema_refuses_what_the_compiler_refuses_by_shape() {
    let v = validator();
    let pools = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1 }\n";
    let ok = format!("{pools}default: {{ route: [a] }}\n");
    assert!(schema_errors(&v, &ok).is_empty());
    compile(&ok, Path::new(".")).unwrap();
    for bad in [
        format!("{pools}rules:\n  - name: x\n    when: {{ gpu_count: 2 }}\n    route: [a]\ndefault: {{ route: [a] }}\n"),
        format!("{pools}default: {{ route: [] }}\n"),
        format!("{pools}default: {{ route: [a] }}\nretry: {{ backoff_ms: 20000 }}\n"),
        format!("{pools}default: {{ route: [a] }}\nretry: {{ max_attempts: 0 }}\n"),
        format!("{pools}default: {{ route: [a] }}\nretry: {{ escalate_after_ms: 0 }}\n"),
        format!("{pools}default: {{ route: [a] }}\nretry: {{ escalate_after_ms: 60001 }}\n"),
        format!("{pools}default: {{ route: [a] }}\nretry: {{ resume: maybe }}\n"),
        "version: 2\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1 }\ndefault: { route: [a] }\n".into(),
        "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1, select: random }\ndefault: { route: [a] }\n".into(),
        "version: 1\nmodels:\n  m: { tokenizer: { gguf: a, json: b }, context_window: 8 }\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1 }\ndefault: { route: [a] }\n".into(),
    ] {
        assert!(!schema_errors(&v, &bad).is_empty(), "schema accepts:\n{bad}");
        assert!(compile(&bad, Path::new(".")).is_err(), "compiler accepts:\n{bad}");
    }
}

/// `resume` and `escalate_after_ms` reach the compiled policy, inherited by rules that
/// leave them out.
#[test]
fn resume_and_escalation_are_compiled_and_inherited() {
    let yaml = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1 }\n  b: { class: cpu, capacity: on_demand, cost_per_hour: 2 }\nretry: { escalate_after_ms: 800 }\nrules:\n  - name: off\n    when: { stream: true }\n    route: [a, b]\n    retry: { resume: false, escalate_after_ms: 250 }\ndefault: { route: [a, b] }\n";
    assert!(schema_errors(&validator(), yaml).is_empty());
    let rules = compile(yaml, Path::new(".")).unwrap();
    let policy = |stream: bool| {
        let f = crate::RequestFeatures {
            stream,
            ..Default::default()
        };
        rules.route(&f).retry
    };
    let off = policy(true);
    assert!(!off.resumes());
    assert_eq!(
        off.escalate_after,
        Some(std::time::Duration::from_millis(250))
    );
    let default = policy(false);
    assert!(default.resumes(), "on by default");
    assert_eq!(
        default.escalate_after,
        Some(std::time::Duration::from_millis(800)),
        "inherited from the file's retry"
    );
}

#[test]
fn select_policy_is_in_the_schema_and_the_compiled_pool() {
    let v = validator();
    let yaml = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1, select: least_loaded }\n  b: { class: cpu, capacity: spot, cost_per_hour: 1 }\n  c: { class: cpu, capacity: spot, cost_per_hour: 1, select: power_of_two }\ndefault: { route: [a] }\n";
    assert!(schema_errors(&v, yaml).is_empty());
    let rules = compile(yaml, Path::new(".")).unwrap();
    let select = |p: &str| rules.pool(p).unwrap().select;
    assert_eq!(select("a"), SelectPolicy::LeastLoaded);
    assert_eq!(select("b"), SelectPolicy::PowerOfTwo);
    assert_eq!(select("c"), SelectPolicy::PowerOfTwo);
    assert_eq!(SelectPolicy::LeastLoaded.name(), "least_loaded");
    assert_eq!(SelectPolicy::PowerOfTwo.name(), "power_of_two");
    assert_eq!(SelectPolicy::default(), SelectPolicy::PowerOfTwo);
    let bad = "version: 1\npools:\n  a: { class: cpu, capacity: spot, cost_per_hour: 1, select: random }\ndefault: { route: [a] }\n";
    let err = compile(bad, Path::new("."))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("random") && err.contains("least_loaded"),
        "{err}"
    );
}
