//! A linear output layer over any backbone's embedding (MAML, Reptile, Meta-LSTM): its parameters,
//! logits, and the cross-entropy loss with its gradient by the backbone's explicit backward pass
//! when it has one, else by candle's.

use candle_core::{Device, Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use super::{init, ops, Backbone, BnMode, ParamSet, Params};

/// The loss of a backbone with a linear output layer, its logits and its gradient.
pub struct LossAndGrad {
    pub loss: Tensor,
    pub logits: Tensor,
    /// d loss / d parameter, by parameter name.
    pub grads: Params,
}

/// Whether a gradient keeps its graph back to the parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Graph {
    /// Loss, logits and gradient are detached; the parameters may be plain tensors.
    Detached,
    /// The gradient stays attached to the graph of the parameters (which must be leaves, i.e.
    /// [`Var`]s, or computed from them), so it can be differentiated again.
    Keep,
}

/// How a linear output layer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadInit {
    /// PyTorch's `nn.Linear` default: weight and bias U(±1/√D).
    #[default]
    Torch,
    /// Weight N(0, 1), bias 0: cbfinn/maml's Omniglot `w5 = tf.Variable(tf.random_normal(…))`.
    Normal,
    /// Weight Glorot-uniform, bias 0: cbfinn/maml's miniImageNet `w5` (`xavier_initializer`).
    Glorot,
}

/// The backbone's parameters for `height`×`width` inputs followed by a linear `ways`-unit output
/// layer (`head.weight` [ways, D], `head.bias` [ways], PyTorch-default init), drawn in that order.
pub fn init_linear_head(
    backbone: &dyn Backbone,
    size: (usize, usize),
    ways: usize,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<ParamSet> {
    init_linear_head_with(backbone, size, ways, HeadInit::Torch, rng, device)
}

/// [`init_linear_head`] with the output layer initialised by `head`.
pub fn init_linear_head_with(
    backbone: &dyn Backbone,
    (height, width): (usize, usize),
    ways: usize,
    head: HeadInit,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> Result<ParamSet> {
    let dim = backbone.embedding_dim(height, width)?;
    let mut p = backbone.init(rng, device)?;
    let (weight, bias) = match head {
        HeadInit::Torch => (
            init::torch_default(rng, &[ways, dim], dim, device)?,
            init::torch_default(rng, &[ways], dim, device)?,
        ),
        HeadInit::Normal => (
            init::normal(rng, &[ways, dim], 0.0, 1.0, device)?,
            Tensor::zeros(ways, candle_core::DType::F32, device)?,
        ),
        HeadInit::Glorot => (
            init::glorot_uniform(rng, &[ways, dim], dim, ways, device)?,
            Tensor::zeros(ways, candle_core::DType::F32, device)?,
        ),
    };
    p.push("head.weight", weight)?;
    p.push("head.bias", bias)?;
    Ok(p)
}

/// [B, ways] logits of the linear output layer over the embedding of `x`.
pub fn linear_logits(
    backbone: &dyn Backbone,
    params: &Params,
    x: &Tensor,
    bn: BnMode,
) -> Result<Tensor> {
    let emb = backbone.forward(params, x, bn)?;
    emb.matmul(&params.get("head.weight")?.t()?)?.broadcast_add(params.get("head.bias")?)
}

/// Mean cross-entropy of the linear-head logits of `x` (batch statistics) against `labels` [B]
/// (u32), and its gradient with respect to every parameter.
pub fn linear_loss_and_grad(
    backbone: &dyn Backbone,
    params: &Params,
    x: &Tensor,
    labels: &Tensor,
    graph: Graph,
) -> Result<LossAndGrad> {
    match backbone.explicit_backward() {
        Some(explicit) => {
            let params = match graph {
                Graph::Detached => detached(params),
                Graph::Keep => params.clone(),
            };
            explicit_loss_and_grad(explicit, &params, x, labels)
        }
        None => autograd_loss_and_grad(backbone, params, x, labels, graph),
    }
}

fn detached(params: &Params) -> Params {
    let mut out = Params::new();
    for (n, t) in params.iter() {
        out.insert(n.clone(), t.detach());
    }
    out
}

/// By the backbone's explicit backward pass: only the forward pass and the fused backward ops are
/// recorded (nothing at all with detached `params`).
fn explicit_loss_and_grad(
    backbone: &dyn super::ExplicitBackward,
    params: &Params,
    x: &Tensor,
    labels: &Tensor,
) -> Result<LossAndGrad> {
    let tape = backbone.forward_taped(params, x, None)?;
    let emb = tape.embedding();
    let (head_w, head_b) = (params.get("head.weight")?, params.get("head.bias")?);
    let logits = emb.matmul(&head_w.t()?)?.broadcast_add(head_b)?;
    let log_probs = ops::log_softmax(&logits)?;
    let loss = log_probs.gather(&labels.unsqueeze(1)?, 1)?.neg()?.mean_all()?;

    let (n, ways) = logits.dims2()?;
    let d_logits = ((log_probs.exp()?
        - ops::one_hot(&labels.to_vec1::<u32>()?, ways, labels.device())?
            .to_dtype(logits.dtype())?)?
        / n as f64)?;
    let mut grads = tape.backward(params, &d_logits.matmul(head_w)?)?;
    grads.insert("head.weight".to_string(), d_logits.t()?.matmul(emb)?);
    grads.insert("head.bias".to_string(), d_logits.sum(0)?);
    Ok(LossAndGrad { loss, logits, grads })
}

/// By candle's backward pass. A parameter that no gradient reaches is an error: it means the graph
/// was cut, and a zero would silently turn second order into first order.
fn autograd_loss_and_grad(
    backbone: &dyn Backbone,
    params: &Params,
    x: &Tensor,
    labels: &Tensor,
    graph: Graph,
) -> Result<LossAndGrad> {
    let leaves = match graph {
        Graph::Keep => params.clone(),
        Graph::Detached => {
            let mut p = Params::new();
            for (n, t) in params.iter() {
                p.insert(n.clone(), Var::from_tensor(&t.detach())?.as_tensor().clone());
            }
            p
        }
    };
    let logits = linear_logits(backbone, &leaves, x, BnMode::Batch(None))?;
    let loss = ops::cross_entropy(&logits, labels)?;
    let store = loss.backward()?;
    let mut grads = Params::new();
    for (name, t) in leaves.iter() {
        let g = required_grad(&store, t, name)?;
        grads.insert(name.clone(), if graph == Graph::Keep { g } else { g.detach() });
    }
    match graph {
        Graph::Keep => Ok(LossAndGrad { loss, logits, grads }),
        Graph::Detached => Ok(LossAndGrad { loss: loss.detach(), logits: logits.detach(), grads }),
    }
}

/// The gradient of `t` in `store`, or an error naming the parameter when none reached it.
pub fn required_grad(
    store: &candle_core::backprop::GradStore,
    t: &Tensor,
    name: &str,
) -> Result<Tensor> {
    store.get(t).cloned().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "no gradient reached `{name}`: the gradient graph was cut (is {} set to 1?)",
            crate::autograd::KEEP_GRAPH_VAR
        ))
    })
}
