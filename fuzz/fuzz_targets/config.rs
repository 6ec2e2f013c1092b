//! The configuration parser on arbitrary text: a broken file must give an error (with a
//! message that can be printed), never a panic, whichever of the two file kinds it is read as.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = std::path::Path::new("/fuzz/config.toml");
    match config::ProxyConfig::from_toml_str(text, path) {
        Ok(cfg) => drop(format!("{cfg:?}")),
        Err(e) => drop((e.to_string(), e.key().map(str::to_owned), e.location())),
    }
    match config::AgentConfig::from_toml_str(text, path) {
        Ok(cfg) => {
            drop(format!("{cfg:?}"));
            // A token never shows in Debug or Display output, whatever the file held.
            if let config::JoinToken::Inline(secret) = &cfg.join.token {
                assert_eq!(format!("{secret:?}"), "MASKED");
                assert_eq!(format!("{secret}"), "MASKED");
            }
        }
        Err(e) => drop((e.to_string(), e.key().map(str::to_owned), e.location())),
    }
});
