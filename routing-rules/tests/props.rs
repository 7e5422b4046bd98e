//! Property tests of the rules loader: whatever text it is given, it answers with compiled
//! rules or a list of problems — never a panic, never an empty rejection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use proptest::prelude::*;

const VALID: &str = include_str!("../../examples/rules.yaml");

/// Tokens a rules file is made of, to build near-valid files from.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("version: 1\n".to_string()),
        Just("pools:\n".to_string()),
        Just("rules:\n".to_string()),
        Just("  - name: r\n".to_string()),
        Just("    route: [cpu]\n".to_string()),
        Just("    when: { context_tokens: { at_most: 10 } }\n".to_string()),
        Just("  cpu: { class: cpu, capacity: on_demand, cost_per_hour: 0.2 }\n".to_string()),
        Just("retry: { max_attempts: 0 }\n".to_string()),
        Just("&a [*a, *a]\n".to_string()),
        Just("{".to_string()),
        Just("- ".to_string()),
        Just(": ".to_string()),
        "[a-z_]{1,8}: [0-9a-z\\[\\]{}, ]{0,12}\n",
        "[ -~]{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn any_text_compiles_or_lists_its_problems(text in "\\PC{0,400}") {
        if let Err(e) = routing_rules::compile(&text, Path::new(".")) {
            prop_assert!(!e.problems().is_empty());
        }
    }

    #[test]
    fn files_built_from_rules_tokens_compile_or_list_their_problems(
        tokens in proptest::collection::vec(token(), 0..30),
    ) {
        let text: String = tokens.concat();
        if let Err(e) = routing_rules::compile(&text, Path::new(".")) {
            prop_assert!(!e.problems().is_empty());
        }
    }

    /// The shipped example with one byte range cut out or duplicated: never a panic.
    #[test]
    fn a_damaged_example_compiles_or_lists_its_problems(
        at in 0usize..VALID.len(),
        len in 0usize..40,
        dup in any::<bool>(),
    ) {
        let end = (at + len).min(VALID.len());
        let (a, b) = (at.min(end), end);
        if !VALID.is_char_boundary(a) || !VALID.is_char_boundary(b) {
            return Ok(());
        }
        let text = if dup {
            format!("{}{}{}", &VALID[..b], &VALID[a..b], &VALID[b..])
        } else {
            format!("{}{}", &VALID[..a], &VALID[b..])
        };
        if let Err(e) = routing_rules::compile(&text, Path::new("examples")) {
            prop_assert!(!e.problems().is_empty());
        }
    }
}
