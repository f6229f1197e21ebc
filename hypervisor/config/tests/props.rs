//! Property tests: the parser never panics, and the printed configuration parses back.

use moat_config::{Config, DmaPolicy, Dump, ExitAction, LogLevel, SelfTest};
use proptest::prelude::*;
use proptest::sample::select;

/// Fragments that build plausible command lines (valid and invalid).
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        select(LogLevel::NAMES).prop_map(|v| format!("log={v}")),
        (0u32..300).prop_map(|n| format!("smp={n}")),
        select(&["on", "off", "maybe", ""][..]).prop_map(|v| format!("iommu={v}")),
        select(ExitAction::NAMES).prop_map(|v| format!("exit={v}")),
        select(SelfTest::NAMES).prop_map(|v| format!("selftest={v}")),
        select(Dump::NAMES).prop_map(|v| format!("dump={v}")),
        (
            "[a-z0-9]{0,18}",
            0u64..5000,
            select(&["", "K", "M", "G", "T", "MiB"][..]),
            0u32..300,
            proptest::collection::vec((0u8..=255, 0u8..34, 0u8..9), 0..10),
            select(DmaPolicy::NAMES),
        )
            .prop_map(|(name, mem, unit, cpus, devs, policy)| {
                let devs: Vec<String> = devs
                    .iter()
                    .map(|(b, d, f)| format!("{b:02x}:{d:02x}.{f}"))
                    .collect();
                format!(
                    "guest=name={name},mem={mem}{unit},cpus={cpus},dev={},policy={policy}",
                    devs.join("+")
                )
            }),
        "[a-z=,.:+0-9]{0,12}",
    ]
}

proptest! {
    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        let (config, diags) = Config::parse(&s);
        // Everything the parser produced must be printable.
        let _ = config.to_string();
        for d in diags.iter() {
            let _ = d.to_string();
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let s = String::from_utf8_lossy(&bytes);
        let _ = Config::parse(&s);
    }

    #[test]
    fn printed_configuration_parses_back(tokens in proptest::collection::vec(token(), 0..12)) {
        let line = tokens.join(" ");
        let (config, _) = Config::parse(&line);
        let printed = config.to_string();
        let (again, diags) = Config::parse(&printed);
        prop_assert!(diags.is_empty(), "{printed}: {:?}", diags.iter().collect::<Vec<_>>());
        prop_assert_eq!(again, config);
    }
}
