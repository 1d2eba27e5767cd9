//! The run config: everything needed to reproduce a training run, saved as `RUN_DIR/config.json`:
//! a [`Protocol`] (data, episodes, schedule, backbone, test protocol), the method's own settings
//! ([`MethodConfig`]) and where the run came from.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::methods::MethodConfig;
pub use crate::protocol::{DataConfig, Protocol, Validation};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub kshot_version: String,
    /// The command line that started the run.
    pub command: Vec<String>,
    pub preset: Option<String>,
    #[serde(flatten)]
    pub protocol: Protocol,
    pub method: MethodConfig,
}

/// A run config reads as its protocol: `config.data`, `config.train`, `config.episodes`, ...
impl std::ops::Deref for RunConfig {
    type Target = Protocol;
    fn deref(&self) -> &Protocol {
        &self.protocol
    }
}

impl std::ops::DerefMut for RunConfig {
    fn deref_mut(&mut self) -> &mut Protocol {
        &mut self.protocol
    }
}

impl RunConfig {
    pub fn new(protocol: Protocol, method: MethodConfig) -> Self {
        Self {
            kshot_version: crate::VERSION.to_string(),
            command: Vec::new(),
            preset: None,
            protocol,
            method,
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("cannot read {}; is this a kshot run directory?", path.display())
        })?;
        let invalid = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!(
                "{}: not a valid kshot run config ({e}); was it edited by hand?",
                path.display()
            )
        };
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(&e))?;
        let written_by = value["kshot_version"].as_str().unwrap_or("unknown").to_string();
        upgrade_v0_1(&mut value).map_err(|e| {
            anyhow::anyhow!(
                "{}: written by kshot {written_by} in a layout this version cannot read ({e}); retrain with this version or evaluate it with kshot {written_by}",
                path.display()
            )
        })?;
        serde_json::from_value(value).map_err(|e| invalid(&e))
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::checkpoint::write_atomic(path, text.as_bytes())
    }
}

/// Rewrites a config written by kshot 0.1 (the method a string beside one object per method; the
/// backbone always Conv4, Siamese's twin a method setting) into the current layout, in place.
/// Current configs are left alone.
fn upgrade_v0_1(v: &mut serde_json::Value) -> anyhow::Result<()> {
    use serde_json::{json, Value};
    let Some(name) = v.get("method").and_then(Value::as_str).map(str::to_string) else {
        return Ok(());
    };
    let obj = v.as_object_mut().context("the config is not a JSON object")?;
    let mut take = |key: &str| obj.remove(key).unwrap_or_else(|| json!({}));
    let sections = ["protonet", "matching", "siamese", "baseline", "maml", "reptile", "meta_lstm"]
        .map(|k| (k, take(k)));
    let section = |key: &str| sections.iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone());
    let (tag, mut method) = match name.as_str() {
        "protonet" => ("protonet", section("protonet")),
        "matching" => ("matching", section("matching")),
        "siamese" => ("siamese", section("siamese")),
        "baseline" | "baseline++" => ("baseline", section("baseline")),
        "maml" | "fomaml" => ("maml", section("maml")),
        "reptile" => ("reptile", section("reptile")),
        "meta-lstm" => ("meta-lstm", section("meta_lstm")),
        other => anyhow::bail!("unknown method `{other}`"),
    };
    let method = method.as_mut().and_then(Value::as_object_mut).context("no method settings")?;
    method.insert("name".into(), json!(tag));
    match name.as_str() {
        "baseline" => _ = method.insert("head".into(), json!("linear")),
        "baseline++" => _ = method.insert("head".into(), json!("cosine")),
        "fomaml" => _ = method.insert("first_order".into(), json!(true)),
        _ => {}
    }
    let koch = method.remove("twin").is_some_and(|t| t == "koch") && tag == "siamese";
    let method = Value::Object(method.clone());
    obj.insert("method".into(), method);
    if let Some(backbone) = obj.get_mut("backbone").and_then(Value::as_object_mut) {
        if koch {
            let channels = backbone.get("in_channels").cloned().unwrap_or(json!(1));
            *backbone = serde_json::Map::from_iter([
                ("kind".to_string(), json!("koch")),
                ("in_channels".to_string(), channels),
            ]);
        } else if !backbone.contains_key("kind") {
            backbone.insert("kind".into(), json!("conv4"));
        }
    }
    Ok(())
}
