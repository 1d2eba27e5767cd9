#!/usr/bin/env python3
"""PyTorch reference for `kshot bench`: the same workloads as crates/kshot/src/bench/, line for line.

Every workload is a full training step on random normal inputs: forward, backward and an Adam update
(lr 1e-3) of Conv4 (64 channels, 3x3 convolutions without bias, batch norm with batch statistics,
ReLU, 2x2 max-pool), or in resnet12-step-84 of ResNet-12 (crates/kshot/src/nn/resnet12.rs: widths
64-160-320-640, batch statistics, LeakyReLU 0.1, 1x1 shortcut, global average pool, no DropBlock).
The predict-* workloads are inference instead: `kshot predict`'s ProtoNet path without decoding.
gnn-5w1s-100graphs is a Garcia & Bruna GNN training batch written as the official modules.
mann-16x50-steps is a MANN training batch (Santoro et al. 2016) as crates/kshot/src/methods/mann.rs.
maml2-20w5s, matching-5w1s15q, meta-lstm-5w1s15q, baseline-16x4112c and eval-protonet-5w1s15q follow
kshot's presets (maml-omniglot-20w5s with 2 tasks, matching-omniglot-5way-1shot, meta-lstm-omniglot-5w1s,
baseline-omniglot, protonet-omniglot-1shot); metanet-5w1s10q follows metanet-omniglot-5w1s;
see crates/kshot/src/bench/methods.rs.
Prints one JSON line: {"workload", "samples_ms", "torch", "cpu_capability", "threads"}.

    python benches/pytorch_reference.py --workload conv4-step-28 --reps 20 --threads 2
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def conv4_params(in_channels, hidden=64, blocks=4):
    params = {}
    cin = in_channels
    for i in range(blocks):
        w = torch.empty(hidden, cin, 3, 3)
        torch.nn.init.kaiming_uniform_(w, a=5 ** 0.5)  # PyTorch's default: U(-1/sqrt(fan_in), +)
        params[f"conv{i}.weight"] = w
        params[f"bn{i}.weight"] = torch.ones(hidden)
        params[f"bn{i}.bias"] = torch.zeros(hidden)
        cin = hidden
    return params


def resnet12_params(in_channels, widths=(64, 160, 320, 640)):
    # As MetaOptNet / Tian et al.: kaiming_normal_(fan_out, leaky_relu), BN scale 1, shift 0.
    def conv(cout, cin, k):
        w = torch.empty(cout, cin, k, k)
        torch.nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="leaky_relu")
        return w

    params = {}
    cin = in_channels
    for b, width in enumerate(widths):
        for j in range(3):
            params[f"block{b}.conv{j}.weight"] = conv(width, cin if j == 0 else width, 3)
            params[f"block{b}.bn{j}.weight"] = torch.ones(width)
            params[f"block{b}.bn{j}.bias"] = torch.zeros(width)
        params[f"block{b}.shortcut.weight"] = conv(width, cin, 1)
        params[f"block{b}.shortcut_bn.weight"] = torch.ones(width)
        params[f"block{b}.shortcut_bn.bias"] = torch.zeros(width)
        cin = width
    return params


def linear_head(params, ways, dim):
    bound = 1 / dim ** 0.5
    params["head.weight"] = torch.empty(ways, dim).uniform_(-bound, bound)
    params["head.bias"] = torch.empty(ways).uniform_(-bound, bound)
    return params


def conv4(params, x, blocks=4, eps=1e-5, running=None, momentum=0.1):
    # running: {i: (mean, var)} folded with the batch statistics (as kshot's BnMode::Batch(Some)).
    for i in range(blocks):
        x = F.conv2d(x, params[f"conv{i}.weight"], padding=1)
        mean, var = running[i] if running is not None else (None, None)
        x = F.batch_norm(x, mean, var, params[f"bn{i}.weight"], params[f"bn{i}.bias"], training=True,
                         momentum=momentum, eps=eps)
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1)


def running_stats(width, blocks=4):
    return {i: (torch.zeros(width), torch.ones(width)) for i in range(blocks)}


def resnet12(params, x, blocks=4, leak=0.1):
    def bn(h, name):
        return F.batch_norm(h, None, None, params[f"{name}.weight"], params[f"{name}.bias"],
                            training=True)

    for b in range(blocks):
        h = x
        for j in range(3):
            h = bn(F.conv2d(h, params[f"block{b}.conv{j}.weight"], padding=1), f"block{b}.bn{j}")
            if j < 2:
                h = F.leaky_relu(h, leak)
        shortcut = bn(F.conv2d(x, params[f"block{b}.shortcut.weight"]), f"block{b}.shortcut_bn")
        x = F.max_pool2d(F.leaky_relu(h + shortcut, leak), 2)
    return x.mean((2, 3))


def head(params, emb):
    return F.linear(emb, params["head.weight"], params["head.bias"])


def leaves(params):
    return {k: v.clone().requires_grad_(True) for k, v in params.items()}


def labels(ways, per_class):
    return torch.arange(ways).repeat_interleave(per_class)


def classifier_step(channels, size):
    params = leaves(linear_head(conv4_params(channels), 5, 64 * (size // 16) ** 2))
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    x = torch.randn(80, channels, size, size)
    y = labels(5, 16)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(params, conv4(params, x)), y)
        loss.backward()
        opt.step()

    return step


def resnet12_step(batch=20, size=84):
    params = leaves(linear_head(resnet12_params(3), 5, 640))
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    x = torch.randn(batch, 3, size, size)
    y = labels(5, batch // 5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(params, resnet12(params, x)), y)
        loss.backward()
        opt.step()

    return step


def maml_step(inner_steps=5, alpha=0.4, ways=5, shots=1, queries=15):
    params = leaves(linear_head(conv4_params(1), ways, 64))
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    xs, ys = torch.randn(ways * shots, 1, 28, 28), labels(ways, shots)
    xq, yq = torch.randn(ways * queries, 1, 28, 28), labels(ways, queries)
    names = list(params)

    def step():
        opt.zero_grad(set_to_none=True)
        fast = dict(params)
        for _ in range(inner_steps):
            loss = F.cross_entropy(head(fast, conv4(fast, xs)), ys)
            grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=True)
            fast = {n: fast[n] - alpha * g for n, g in zip(names, grads)}
        F.cross_entropy(head(fast, conv4(fast, xq)), yq).backward()
        opt.step()

    return step


def protonet_step(ways=60, shots=1, queries=5):
    params = leaves(conv4_params(1))
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    xs, xq = torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28)
    yq = labels(ways, queries)

    def step():
        opt.zero_grad(set_to_none=True)
        emb = conv4(params, torch.cat([xs, xq]))
        support, query = emb[: ways * shots], emb[ways * shots:]
        prototypes = support.reshape(ways, shots, -1).mean(1)
        logits = -torch.cdist(query, prototypes).pow(2)
        F.cross_entropy(logits, yq).backward()
        opt.step()

    return step


def conv4_inference(params, running, x):
    # Conv4 in inference mode: batch norm with the running statistics `running[i]` = (mean, var).
    for i in range(4):
        x = F.conv2d(x, params[f"conv{i}.weight"], padding=1)
        mean, var = running[i]
        x = F.batch_norm(x, mean, var, params[f"bn{i}.weight"], params[f"bn{i}.bias"], training=False)
        x = F.max_pool2d(F.relu(x), 2)
    return x.flatten(1)


def predict(queries, ways=5, batch=256):
    # kshot predict's model path: BN with running statistics (inference), prototypes of the
    # support embeddings, squared distances of each batch of queries; no gradients.
    params = conv4_params(1)
    running = {i: (torch.zeros(64), torch.ones(64)) for i in range(4)}
    xs, xq = torch.randn(ways, 1, 28, 28), torch.randn(queries, 1, 28, 28)

    def embed(x):
        return conv4_inference(params, running, x)

    def step():
        with torch.no_grad():
            prototypes = embed(xs)
            for start in range(0, queries, batch):
                (-torch.cdist(embed(xq[start:start + batch]), prototypes).pow(2)).tolist()

    return step


class _EmbeddingOmniglot(torch.nn.Module):
    # few-shot-gnn models/models.py EmbeddingOmniglot, as kshot's gnn-omniglot backbone.
    def __init__(self, emb=64, nef=64):
        super().__init__()
        nn = torch.nn
        self.convs = nn.ModuleList([nn.Conv2d(1 if i == 0 else nef, nef, 3, padding=1 if i < 2 else 0,
                                              bias=False) for i in range(4)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(nef) for _ in range(4)])
        self.fc = nn.Linear(3 * 3 * nef, emb, bias=False)
        self.bn_fc = nn.BatchNorm1d(emb)

    def forward(self, x):
        for i in range(4):
            x = self.bns[i](self.convs[i](x))
            if i < 2:
                x = F.max_pool2d(x, 2)
            x = F.leaky_relu(x, 0.1)
        return F.leaky_relu(self.bn_fc(self.fc(x.flatten(1))))


class _Adjacency(torch.nn.Module):
    # few-shot-gnn models/gnn_iclr.py Wcompute (J2 operator, softmax), 1x1 convolutions as linears.
    def __init__(self, cin, nf, ratios=(2, 1.5, 1, 1), drop=0.0):
        super().__init__()
        nn = torch.nn
        widths = [int(nf * r) for r in ratios]
        self.fcs = nn.ModuleList([nn.Linear(a, b) for a, b in zip([cin] + widths[:-1], widths)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(w) for w in widths])
        self.out = nn.Linear(widths[-1], 1)
        self.drop = drop

    def forward(self, x):
        b, n, f = x.shape
        h = (x.unsqueeze(2) - x.unsqueeze(1)).abs().reshape(b * n * n, f)
        for k, (fc, bn) in enumerate(zip(self.fcs, self.bns)):
            h = F.leaky_relu(bn(fc(h)))
            if k == 0 and self.drop > 0:
                h = F.dropout(h, self.drop, self.training)
        scores = self.out(h).reshape(b, n, n) - torch.eye(n) * 1e8
        return F.softmax(scores, dim=2)


class _GraphConv(torch.nn.Module):
    # few-shot-gnn Gconv over {I, A}.
    def __init__(self, cin, cout, bn=True):
        super().__init__()
        self.fc = torch.nn.Linear(2 * cin, cout)
        self.bn = torch.nn.BatchNorm1d(cout) if bn else None

    def forward(self, a, x):
        b, n, f = x.shape
        h = self.fc(torch.cat([x, torch.bmm(a, x)], 2).reshape(b * n, 2 * f))
        if self.bn is not None:
            h = self.bn(h)
        return h.reshape(b, n, -1)


class _GnnOmniglot(torch.nn.Module):
    # few-shot-gnn GNN_nl_omniglot (nf = 96, 2 layers).
    def __init__(self, features, ways, growth=48, layers=2):
        super().__init__()
        nn = torch.nn
        self.adj = nn.ModuleList([_Adjacency(features + growth * i, features + growth * i)
                                  for i in range(layers)])
        self.conv = nn.ModuleList([_GraphConv(features + growth * i, growth) for i in range(layers)])
        last = features + growth * layers
        self.adj_out = _Adjacency(last, features + growth * (layers - 1), drop=0.3)
        self.conv_out = _GraphConv(last, ways)

    def forward(self, x):
        for adj, conv in zip(self.adj, self.conv):
            x = torch.cat([x, F.leaky_relu(conv(adj(x), x))], 2)
        return self.conv_out(self.adj_out(x), x)[:, 0, :]


def gnn_step(graphs=100, ways=5, shots=1):
    # A GNN training batch: `graphs` graphs of one query and ways*shots support images, all images
    # embedded in one batch, node features [embedding | one-hot label (zeros for the query)].
    enc, gnn = _EmbeddingOmniglot(), _GnnOmniglot(64 + ways, ways)
    opt = torch.optim.Adam(list(enc.parameters()) + list(gnn.parameters()), lr=1e-3)
    n = ways * shots
    xq, xs = torch.randn(graphs, 1, 28, 28), torch.randn(graphs * n, 1, 28, 28)
    onehot = F.one_hot(labels(ways, shots), ways).float().expand(graphs, n, ways)
    yq = torch.randint(0, ways, (graphs,))

    def step():
        opt.zero_grad(set_to_none=True)
        emb = enc(torch.cat([xq, xs]))
        q = torch.cat([emb[:graphs], torch.zeros(graphs, ways)], 1).unsqueeze(1)
        s = torch.cat([emb[graphs:].reshape(graphs, n, -1), onehot], 2)
        F.cross_entropy(gnn(torch.cat([q, s], 1)), yq).backward()
        opt.step()

    return step


class _Mann(torch.nn.Module):
    # kshot's methods/mann.rs: LSTM controller over [x | label(y_{t-1}) | r_{t-1}], LRUA memory.
    def __init__(self, pixels=400, labels=5, hidden=200, slots=128, size=40, heads=4, gamma=0.95):
        super().__init__()
        self.cell = torch.nn.LSTMCell(pixels + labels + heads * size, hidden)
        self.key = torch.nn.Linear(hidden, heads * size)
        self.gate = torch.nn.Linear(hidden, heads)
        self.out = torch.nn.Linear(hidden + heads * size, labels)
        self.slots, self.size, self.heads, self.gamma = slots, size, heads, gamma

    def forward(self, x):  # x: [B, T, pixels + labels]
        b, t, _ = x.shape
        h = c = x.new_zeros(b, self.cell.hidden_size)
        r = x.new_zeros(b, self.heads * self.size)
        mem = x.new_full((b, self.slots, self.size), 1e-6)
        w_r = x.new_zeros(b, self.heads, self.slots)
        usage = x.new_zeros(b, self.slots)
        outs = []
        for step in range(t):
            h, c = self.cell(torch.cat([x[:, step], r], 1), (h, c))
            k = torch.tanh(self.key(h)).view(b, self.heads, self.size)
            alpha = torch.sigmoid(self.gate(h)).unsqueeze(2)
            order = usage.argsort(dim=1, stable=True)[:, : self.heads]
            w_lu = F.one_hot(order, self.slots).to(x.dtype)
            keep = 1 - F.one_hot(order[:, 0], self.slots).to(x.dtype).unsqueeze(2)
            w_w = alpha * w_r + (1 - alpha) * w_lu
            mem = mem * keep + w_w.transpose(1, 2) @ k
            cos = (k @ mem.transpose(1, 2)) / (k.norm(dim=2, keepdim=True) @ mem.norm(dim=2, keepdim=True).transpose(1, 2) + 1e-8)
            w_r = cos.softmax(2)
            r = (w_r @ mem).reshape(b, -1)
            usage = (self.gamma * usage + w_r.sum(1) + w_w.sum(1)).detach()
            outs.append(torch.cat([h, r], 1))
        return self.out(torch.stack(outs, 1))


def mann_step(batch=16, ways=5, instances=10):
    net = _Mann()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = ways * instances
    y = torch.stack([labels(ways, instances)[torch.randperm(steps)] for _ in range(batch)])
    prev = torch.cat([torch.zeros(batch, 1, ways), F.one_hot(y[:, :-1], ways).float()], 1)
    x = torch.cat([torch.randn(batch, steps, 400), prev], 2)

    def step():
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        F.cross_entropy(logits.reshape(-1, ways), y.reshape(-1)).backward()
        opt.step()

    return step


def strided_conv4_params(in_channels, hidden=64, blocks=4):
    # crates/kshot/src/nn/strided_conv4.rs, MAML's Omniglot net: Glorot-uniform 3x3 convolutions
    # with a bias, batch norm with an offset and no scale.
    params = {}
    cin = in_channels
    for i in range(blocks):
        w = torch.empty(hidden, cin, 3, 3)
        torch.nn.init.xavier_uniform_(w)
        params[f"conv{i}.weight"] = w
        params[f"conv{i}.bias"] = torch.zeros(hidden)
        params[f"bn{i}.bias"] = torch.zeros(hidden)
        cin = hidden
    return params


def same_padding(n):
    # TensorFlow 'SAME' for a 3x3 window, stride 2: (before, after).
    total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
    return total // 2, total - total // 2


def strided_conv4(params, x, blocks=4, eps=1e-3):
    # conv 3x3 stride 2 'SAME' + bias -> batch norm (batch statistics, offset only) -> ReLU; mean
    # over space.
    for i in range(blocks):
        (top, bottom), (left, right) = same_padding(x.shape[2]), same_padding(x.shape[3])
        x = F.conv2d(F.pad(x, (left, right, top, bottom)), params[f"conv{i}.weight"],
                     params[f"conv{i}.bias"], stride=2)
        x = F.relu(F.batch_norm(x, None, None, None, params[f"bn{i}.bias"], training=True, eps=eps))
    return x.mean((2, 3))


def maml20_step(tasks=2, ways=20, shots=5, queries=5, inner_steps=5, alpha=0.1):
    # maml-omniglot-20w5s (2 of its 16 tasks): the inner loss is Σ CE / K, the batch-norm offsets
    # are meta-learned but not adapted, head N(0, 1) with a zero bias.
    params = strided_conv4_params(1)
    params["head.weight"] = torch.randn(ways, 64)
    params["head.bias"] = torch.zeros(ways)
    params = leaves(params)
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    data = [(torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28))
            for _ in range(tasks)]
    ys, yq = labels(ways, shots), labels(ways, queries)
    adapted = [n for n in params if not n.startswith("bn")]

    def step():
        opt.zero_grad(set_to_none=True)
        for xs, xq in data:
            fast = dict(params)
            for _ in range(inner_steps):
                logits = head(fast, strided_conv4(fast, xs))
                loss = F.cross_entropy(logits, ys, reduction="sum") / shots
                grads = torch.autograd.grad(loss, [fast[n] for n in adapted], create_graph=True)
                fast.update({n: fast[n] - alpha * g for n, g in zip(adapted, grads)})
            (F.cross_entropy(head(fast, strided_conv4(fast, xq)), yq) / tasks).backward()
        opt.step()

    return step


def cosine_similarity(a, b, eps=1e-8):
    an = a / (a.pow(2).sum(1, keepdim=True) + eps).sqrt()
    bn = b / (b.pow(2).sum(1, keepdim=True) + eps).sqrt()
    return an @ bn.t()


def matching_step(ways=5, shots=1, queries=15):
    # matching-omniglot-5way-1shot, one episode: Conv4 (running statistics folded in), cosine
    # attention over the support set, log P(y | x, S), no FCE.
    params = leaves(conv4_params(1))
    running = running_stats(64)
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    xs, xq = torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28)
    onehot = F.one_hot(labels(ways, shots), ways).float()
    yq = labels(ways, queries)

    def step():
        opt.zero_grad(set_to_none=True)
        emb = conv4(params, torch.cat([xs, xq]), running=running)
        support, query = emb[: ways * shots], emb[ways * shots:]
        attention = F.softmax(cosine_similarity(query, support), 1)
        F.cross_entropy(torch.log(attention @ onehot + 1e-12), yq).backward()
        opt.step()

    return step


def preprocess(x, p=10.0):
    # Andrychowicz et al.: (log|x|/p, sgn x) when |x| >= e^-p, else (-1, e^p x); x: [N] -> [N, 2].
    big = x.abs() >= torch.exp(torch.tensor(-p))
    first = torch.where(big, x.abs().log() / p, -torch.ones_like(x))
    second = torch.where(big, x.sign(), x * torch.exp(torch.tensor(p)))
    return torch.stack([first, second], 1)


def meta_lstm_step(ways=5, shots=1, queries=15, steps=12, hidden=20, clip=0.25):
    # meta-lstm-omniglot-5w1s (Ravi & Larochelle, first order): the learner is a 32-filter Conv4
    # (BN eps 1e-3, batch statistics) + linear head whose flattened weights are the cell state c of
    # a coordinate-wise two-layer meta-learner, shared over all P coordinates. Layer 1: an LSTM
    # (hidden 20) over x_t = [pre(grad), pre(loss)]; layer 2: c_t = f_t * c_{t-1} - i_t * grad_t,
    # i_t = sigmoid([h_t, x_t, c_{t-1}, i_{t-1}] W_I + b_I), f_t likewise. The learner's loss and
    # gradient (of the mean CE, over B) are inputs without a gradient path (first order).
    learner = linear_head(conv4_params(1, hidden=32), ways, 32)
    for i in range(4):
        learner[f"bn{i}.weight"].uniform_(0, 1)
    names = list(learner)
    shapes = [learner[n].shape for n in names]
    sizes = [learner[n].numel() for n in names]
    c0 = torch.cat([learner[n].flatten() for n in names])

    def uniform(*shape, bound=0.01):
        return torch.empty(*shape).uniform_(-bound, bound)

    meta = leaves({
        "c0": c0, "w_ih": uniform(4, 4 * hidden), "w_hh": uniform(hidden, 4 * hidden),
        "bias": uniform(4 * hidden), "gate_i.weight": uniform(hidden + 6, 1),
        "gate_f.weight": uniform(hidden + 6, 1), "gate_i.bias": torch.empty(1).uniform_(-5, -4),
        "gate_f.bias": torch.empty(1).uniform_(4, 5),
    })
    opt = torch.optim.Adam(meta.values(), lr=1e-3)
    xs, xq = torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28)
    ys, yq = labels(ways, shots), labels(ways, queries)
    rows = c0.numel()

    def learner_loss(c, x, y):
        params = {n: t.reshape(s) for n, t, s in zip(names, c.split(sizes), shapes)}
        return F.cross_entropy(head(params, conv4(params, x, eps=1e-3)), y)

    def step():
        opt.zero_grad(set_to_none=True)
        m = meta
        c = m["c0"].unsqueeze(1)
        h = cell = torch.zeros(rows, hidden)
        i_prev = f_prev = torch.zeros(rows, 1)
        for _ in range(steps):
            leaf = c.detach().flatten().requires_grad_(True)
            loss = learner_loss(leaf, xs, ys)
            (grad,) = torch.autograd.grad(loss, leaf)
            grad = (grad / xs.shape[0]).unsqueeze(1)
            x = torch.cat([preprocess(grad.flatten()), preprocess(loss.detach().reshape(1)).expand(rows, 2)], 1)
            gi, gf, gg, go = (x @ m["w_ih"] + h @ m["w_hh"] + m["bias"]).chunk(4, 1)
            cell = torch.sigmoid(gf) * cell + torch.sigmoid(gi) * torch.tanh(gg)
            h = torch.sigmoid(go) * torch.tanh(cell)
            i = torch.sigmoid(torch.cat([h, x, c, i_prev], 1) @ m["gate_i.weight"] + m["gate_i.bias"])
            f = torch.sigmoid(torch.cat([h, x, c, f_prev], 1) @ m["gate_f.weight"] + m["gate_f.bias"])
            c = f * c - i * grad
            i_prev, f_prev = i, f
        learner_loss(c.flatten(), xq, yq).backward()
        torch.nn.utils.clip_grad_norm_(meta.values(), clip)
        opt.step()

    return step


def baseline_step(classes=4112, batch=16):
    # baseline-omniglot, one pretraining mini-batch: Conv4 with He-normal convolutions (running
    # statistics folded in) + a linear head over every training class (zero bias); each step draws
    # `batch` (class, image) pairs from a set of one image per class.
    params = conv4_params(1)
    for i in range(4):
        torch.nn.init.normal_(params[f"conv{i}.weight"], std=(2 / (9 * 64)) ** 0.5)
    params = linear_head(params, classes, 64)
    params["head.bias"].zero_()
    params = leaves(params)
    running = running_stats(64)
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    images = torch.rand(classes, 1, 28, 28)

    def step():
        opt.zero_grad(set_to_none=True)
        y = torch.randint(0, classes, (batch,))
        F.cross_entropy(head(params, conv4(params, images[y], running=running)), y).backward()
        opt.step()

    return step


def eval_step(ways=5, shots=1, queries=15):
    # One ProtoNet test episode in inference mode (kshot eval's model path): prototypes of the
    # support embeddings (BN running statistics), the queries' squared distances, their accuracy.
    params = conv4_params(1)
    running = running_stats(64)
    xs, xq = torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28)
    yq = labels(ways, queries)

    def embed(x):
        return conv4_inference(params, running, x)

    def step():
        with torch.no_grad():
            prototypes = embed(xs).reshape(ways, shots, -1).mean(1)
            logits = -torch.cdist(embed(xq), prototypes).pow(2)
            (logits.argmax(1) == yq).float().mean().item()

    return step


def _lecun(*shape):
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return torch.randn(*shape) / fan_in ** 0.5


def metanet_step(ways=5, shots=1, queries=10, hidden=20, chunks=5, k=7.0, clip=10.0):
    # metanet-omniglot-5w1s (Munkhdalai & Yu, crates/kshot/src/methods/metanet.rs): a base learner
    # and a key network of 5 blocks [conv 64@3x3, no bias] -> ReLU -> 2x2 max-pool (ceil mode),
    # fc 64->64, fc 64->N. Meta information: preprocessed (k = 7) gradients of the slow key
    # network's CE on each support chunk and of the slow base learner's CE on each support image,
    # detached. Coordinate-wise LSTMs (2 -> 20, linear 20 -> 1) over the chunks give the key
    # network's fast weights; coordinate-wise MLPs (2 -> 20 -> 20 -> 1) give each support image's
    # fast weights for the base learner, stored beside its key. A query reads them by a softmax of
    # cosine similarities; layers are relu(slow(x)) + relu(fast(x)). Summed query CE, clip 10, Adam.
    def net(prefix, fc2=True):
        p = {f"{prefix}.conv{i}": _lecun(64, 1 if i == 0 else 64, 3, 3) for i in range(5)}
        p[f"{prefix}.fc1"] = _lecun(64, 64)
        if fc2:
            p[f"{prefix}.fc2"] = _lecun(ways, 64)
        return p

    params = {**net("base"), **net("key", fc2=False)}
    for name in ["key_conv", "key_fc"]:
        params[f"{name}.w_ih"] = torch.empty(4 * hidden, 2).uniform_(-hidden ** -0.5, hidden ** -0.5)
        params[f"{name}.w_hh"] = torch.empty(4 * hidden, hidden).uniform_(-hidden ** -0.5, hidden ** -0.5)
        params[f"{name}.bias"] = torch.zeros(4 * hidden)
        params[f"{name}.out.weight"] = 0.1 * _lecun(1, hidden)
        params[f"{name}.out.bias"] = torch.zeros(1)
    for name in ["base_conv", "base_fc"]:
        for layer, (cin, cout, scale) in zip(["l1", "l2", "out"], [(2, hidden, 1.0), (hidden, hidden, 1.0), (hidden, 1, 0.1)]):
            params[f"{name}.{layer}.weight"] = scale * _lecun(cout, cin)
            params[f"{name}.{layer}.bias"] = torch.zeros(cout)
    params = leaves(params)
    key_fc2 = _lecun(ways, 64)
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    xs, xq = torch.randn(ways * shots, 1, 28, 28), torch.randn(ways * queries, 1, 28, 28)
    ys, yq = labels(ways, shots), labels(ways, queries)
    convs = [f"conv{i}" for i in range(5)]

    def trunk(p, prefix, x, fast=None, per_image=False):
        h = x
        for i, c in enumerate(convs):
            y = F.conv2d(h, p[f"{prefix}.{c}"], padding=1).relu()
            if fast is not None and per_image:
                m, ci, hh, ww = h.shape
                w = fast[i].reshape(-1, ci, 3, 3)
                y = y + F.conv2d(h.reshape(1, m * ci, hh, ww), w, padding=1, groups=m).reshape(m, -1, hh, ww).relu()
            elif fast is not None:
                y = y + F.conv2d(h, fast[i], padding=1).relu()
            h = F.max_pool2d(y, 2, ceil_mode=True)
        return h.flatten(1)

    def grads(prefix, x, y, fc2, with_fc2):
        p = {n: params[f"{prefix}.{n}"].detach().requires_grad_(True) for n in convs + ["fc1"]}
        if with_fc2:
            fc2 = fc2.detach().requires_grad_(True)
        logits = trunk({f"{prefix}.{n}": t for n, t in p.items()}, prefix, x).matmul(p["fc1"].t()).relu().matmul(fc2.t())
        inputs = [p[n] for n in convs] + [p["fc1"]] + ([fc2] if with_fc2 else [])
        g = torch.autograd.grad(F.cross_entropy(logits, y), inputs)
        return torch.cat([t.flatten() for t in g[:5]]), torch.cat([t.flatten() for t in g[5:]])

    def pre(x):
        big = x.abs() >= torch.exp(torch.tensor(-k))
        first = torch.where(big, x.abs().log() / k, -torch.ones_like(x))
        second = torch.where(big, x.sign(), x * torch.exp(torch.tensor(k)))
        return torch.stack([first, second], 1)

    def lstm(name, inputs):
        p = params
        h = c = torch.zeros(inputs[0].shape[0], hidden)
        for x in inputs:
            gi, gf, gg, go = (x @ p[f"{name}.w_ih"].t() + h @ p[f"{name}.w_hh"].t() + p[f"{name}.bias"]).chunk(4, 1)
            c = torch.sigmoid(gf) * c + torch.sigmoid(gi) * torch.tanh(gg)
            h = torch.sigmoid(go) * torch.tanh(c)
        return (h @ p[f"{name}.out.weight"].t() + p[f"{name}.out.bias"]).flatten()

    def mlp(name, x):
        p = params
        x = (x @ p[f"{name}.l1.weight"].t() + p[f"{name}.l1.bias"]).relu()
        x = (x @ p[f"{name}.l2.weight"].t() + p[f"{name}.l2.bias"]).relu()
        return (x @ p[f"{name}.out.weight"].t() + p[f"{name}.out.bias"]).flatten()

    def split(flat, shapes):
        out, offset = [], 0
        for s in shapes:
            n = 1
            for d in s[1:]:
                n *= d
            out.append(flat[:, offset:offset + n].reshape(s))
            offset += n
        return out

    def step():
        opt.zero_grad(set_to_none=True)
        n = ys.shape[0]
        size = max(n // chunks, 1)
        key_info = [grads("key", xs[i:i + size], ys[i:i + size], key_fc2, False) for i in range(0, n, size)]
        base_info = [grads("base", xs[i:i + 1], ys[i:i + 1], params["base.fc2"], True) for i in range(n)]
        conv_shapes = [params[f"key.{c}"].shape for c in convs]
        fast_conv = lstm("key_conv", [pre(c) for c, _ in key_info])
        fast_fc1 = lstm("key_fc", [pre(f) for _, f in key_info]).reshape(64, 64)
        fast = split(fast_conv.unsqueeze(0), [(1, *s) for s in conv_shapes])
        fast = [t.squeeze(0) for t in fast]

        def keys(x):
            h = trunk(params, "key", x, fast)
            return h @ params["key.fc1"].t() + h @ fast_fc1.t()

        support_keys, query_keys = keys(xs), keys(xq)
        memory_conv = mlp("base_conv", pre(torch.cat([c for c, _ in base_info]))).reshape(n, -1)
        memory_fc = mlp("base_fc", pre(torch.cat([f for _, f in base_info]))).reshape(n, -1)
        cos = (F.normalize(query_keys, dim=1, eps=1e-8) @ F.normalize(support_keys, dim=1, eps=1e-8).t())
        attention = cos.softmax(1)
        m = xq.shape[0]
        conv = attention @ memory_conv
        fc = attention @ memory_fc
        per_image = split(conv, [(m, *s) for s in conv_shapes])
        fc1, fc2 = split(fc, [(m, 64, 64), (m, ways, 64)])
        h = trunk(params, "base", xq, per_image, per_image=True)
        a = (h @ params["base.fc1"].t()).relu() + torch.bmm(h.unsqueeze(1), fc1.transpose(1, 2)).squeeze(1).relu()
        logits = a @ params["base.fc2"].t() + torch.bmm(a.unsqueeze(1), fc2.transpose(1, 2)).squeeze(1)
        F.cross_entropy(logits, yq, reduction="sum").backward()
        torch.nn.utils.clip_grad_norm_(params.values(), clip)
        opt.step()

    return step


WORKLOADS = {
    "conv4-step-28": lambda: classifier_step(1, 28),
    "conv4-step-84": lambda: classifier_step(3, 84),
    "resnet12-step-84": resnet12_step,
    "maml2-step": maml_step,
    "protonet-60w1s5q": protonet_step,
    "predict-5w1s-1q": lambda: predict(1),
    "predict-5w1s-1000q": lambda: predict(1000),
    "gnn-5w1s-100graphs": gnn_step,
    "mann-16x50-steps": mann_step,
    "maml2-20w5s": maml20_step,
    "matching-5w1s15q": matching_step,
    "meta-lstm-5w1s15q": meta_lstm_step,
    "baseline-16x4112c": baseline_step,
    "eval-protonet-5w1s15q": eval_step,
    "metanet-5w1s10q": metanet_step,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = WORKLOADS[args.workload]()
    for _ in range(args.warmup):
        step()
    samples = []
    for _ in range(args.reps):
        t = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"workload": args.workload, "samples_ms": samples, "torch": torch.__version__,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
