//! Paper protocols by name. Each method's file defines its own presets ([`crate::methods::Method`]);
//! this module finds them and turns one into a [`RunConfig`]. Flags given next to a preset override
//! it.

use crate::config::RunConfig;
pub use crate::methods::Preset;

/// Every preset, in the order `kshot presets` lists them.
pub fn all() -> Vec<Preset> {
    crate::methods::presets()
}

pub fn find(name: &str) -> anyhow::Result<Preset> {
    let mut presets = all();
    match presets.iter().position(|p| p.name == name) {
        Some(i) => Ok(presets.swap_remove(i)),
        None => {
            let names: Vec<&str> = presets.iter().map(|p| p.name).collect();
            anyhow::bail!("unknown preset `{name}`; choose one of: {}", names.join(", "))
        }
    }
}

/// The run config of preset `name`, with its name recorded.
pub fn config(name: &str) -> anyhow::Result<RunConfig> {
    let preset = find(name)?;
    let (protocol, method) = (preset.build)();
    let mut c = RunConfig::new(protocol, method);
    c.preset = Some(preset.name.to_string());
    Ok(c)
}

/// The defaults when no preset is named: the 1-shot ProtoNet Omniglot protocol.
pub fn default_config() -> RunConfig {
    let (protocol, method) = (find("protonet-omniglot-1shot").expect("a built-in preset").build)();
    RunConfig::new(protocol, method)
}
