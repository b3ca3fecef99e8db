//! The forward model as gradalign sees it: nodes in topological order, initializers in file
//! order, and the validation that turns malformed files into errors naming what is wrong.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use prost::Message;

use super::pb;
use super::tensor::HostTensor;

/// Highest default-domain opset whose operator semantics we implement.
pub const MAX_OPSET: i64 = 22;
pub const MIN_OPSET: i64 = 7;

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub op: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attrs: Vec<pb::AttributeProto>,
    /// Operator domain: empty for default-domain ONNX. Other domains (e.g. `ai.onnx.ml` label
    /// heads) are kept so that a graph whose logits do not need them still loads; lowering
    /// refuses them only when the logits depend on them.
    pub domain: String,
}

impl Node {
    pub fn new(
        name: impl Into<String>,
        op: &str,
        inputs: Vec<String>,
        outputs: Vec<String>,
    ) -> Node {
        Node {
            name: name.into(),
            op: op.to_string(),
            inputs,
            outputs,
            attrs: vec![],
            domain: String::new(),
        }
    }
    pub fn with_attr(mut self, a: pb::AttributeProto) -> Node {
        self.attrs.retain(|x| x.name != a.name);
        self.attrs.push(a);
        self
    }
    fn attr(&self, name: &str) -> Option<&pb::AttributeProto> {
        self.attrs.iter().find(|a| a.name == name)
    }
    pub fn has_attr(&self, name: &str) -> bool {
        self.attr(name).is_some()
    }
    pub fn attr_i(&self, name: &str) -> Option<i64> {
        self.attr(name).map(|a| a.i)
    }
    pub fn attr_f(&self, name: &str) -> Option<f32> {
        self.attr(name).map(|a| a.f)
    }
    pub fn attr_ints(&self, name: &str) -> Option<Vec<i64>> {
        self.attr(name).map(|a| a.ints.clone())
    }
    pub fn attr_s(&self, name: &str) -> Option<String> {
        self.attr(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
    pub fn attr_t(&self, name: &str) -> Option<&pb::TensorProto> {
        self.attr(name).and_then(|a| a.t.as_ref())
    }
    /// The tensor a `Constant` node holds, from whichever value attribute it carries.
    pub fn constant_value(&self) -> Result<HostTensor> {
        use ndarray::{ArrayD, IxDyn};
        Ok(if let Some(t) = self.attr_t("value") {
            HostTensor::from_proto(t)?
        } else if let Some(v) = self.attr_ints("value_ints") {
            HostTensor::i64_vec(&v)
        } else if let Some(v) = self.attr_i("value_int") {
            HostTensor::I64(ArrayD::from_elem(IxDyn(&[]), v))
        } else if let Some(v) = self.attr_f("value_float") {
            HostTensor::F32(ArrayD::from_elem(IxDyn(&[]), v))
        } else if let Some(a) = self.attr("value_floats") {
            let v = a.floats.clone();
            HostTensor::F32(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v)?)
        } else {
            bail!(
                "{}: unsupported Constant attribute (need value, value_int(s) or value_float(s))",
                self.describe()
            );
        })
    }
    /// The i-th input, `None` when absent or given as the empty name (ONNX optional input).
    pub fn input(&self, i: usize) -> Option<&str> {
        self.inputs
            .get(i)
            .map(|s| s.as_str())
            .filter(|s| !s.is_empty())
    }
    /// "node 'name' (Op)" for error messages.
    pub fn describe(&self) -> String {
        format!("node '{}' ({})", self.name, self.op)
    }
}

pub mod attr {
    use super::pb;
    pub fn i(name: &str, v: i64) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: 2,
            i: v,
            ..Default::default()
        }
    }
    pub fn f(name: &str, v: f32) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: 1,
            f: v,
            ..Default::default()
        }
    }
    pub fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: 7,
            ints: v.to_vec(),
            ..Default::default()
        }
    }
    pub fn s(name: &str, v: &str) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: 3,
            s: v.as_bytes().to_vec(),
            ..Default::default()
        }
    }
    pub fn t(name: &str, v: pb::TensorProto) -> pb::AttributeProto {
        pb::AttributeProto {
            name: name.into(),
            r#type: 4,
            t: Some(v),
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug)]
pub struct GraphInput {
    pub name: String,
    pub elem_type: i32,
    /// `None` for a symbolic or missing dimension.
    pub dims: Option<Vec<Option<i64>>>,
}

#[derive(Clone, Debug)]
pub struct Model {
    /// Where the model came from, for messages.
    pub source: String,
    pub opset: i64,
    pub nodes: Vec<Node>,
    /// Initializers in `graph.initializer` order (this order defines the gradient columns).
    pub initializers: Vec<(String, HostTensor)>,
    /// Graph inputs that are not initializers.
    pub inputs: Vec<GraphInput>,
    pub outputs: Vec<String>,
}

impl Model {
    /// Take `name` as the model's only output (the logits): a declared output or any value a
    /// node computes. Everything the new output does not depend on is then never lowered.
    pub fn select_output(&mut self, name: &str) -> Result<()> {
        let computed = self
            .nodes
            .iter()
            .any(|n| n.outputs.iter().any(|o| o == name));
        if !computed && !self.outputs.iter().any(|o| o == name) {
            bail!(
                "{}: --output {name}: the model has no output or node output named '{name}' \
                 (its outputs: {})",
                self.source,
                self.outputs.join(", ")
            );
        }
        self.outputs = vec![name.to_string()];
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Model> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read model file {}", path.display()))?;
        let mut proto = pb::ModelProto::decode(bytes.as_slice()).map_err(|e| {
            anyhow!(
                "{} is not a valid ONNX model (protobuf decoding failed: {e})",
                path.display()
            )
        })?;
        if let Some(g) = proto.graph.as_mut() {
            for t in &mut g.initializer {
                super::external::resolve(t, path)
                    .with_context(|| format!("invalid model {}", path.display()))?;
            }
        }
        Model::from_proto(&proto, &path.display().to_string())
    }

    /// A model serialised in memory (e.g. `onnx.ModelProto.SerializeToString()`), named
    /// `source` in messages. External data cannot be resolved without the model's folder.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Model> {
        let proto = pb::ModelProto::decode(bytes).map_err(|e| {
            anyhow!("{source} is not a valid ONNX model (protobuf decoding failed: {e})")
        })?;
        if let Some(g) = &proto.graph {
            if let Some(t) = g
                .initializer
                .iter()
                .find(|t| t.data_location == Some(1) || !t.external_data.is_empty())
            {
                bail!(
                    "{source}: initializer '{}' is stored as external data, which needs the \
                     model's folder: pass the model's path instead of its bytes",
                    t.name
                );
            }
        }
        Model::from_proto(&proto, source)
    }

    pub fn from_proto(proto: &pb::ModelProto, source: &str) -> Result<Model> {
        Self::from_proto_inner(proto, source).with_context(|| format!("invalid model {source}"))
    }

    fn from_proto_inner(proto: &pb::ModelProto, source: &str) -> Result<Model> {
        let opset = proto
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .ok_or_else(|| anyhow!("the model imports no default-domain opset"))?;
        if !(MIN_OPSET..=MAX_OPSET).contains(&opset) {
            bail!(
                "opset {opset} is outside the supported range {MIN_OPSET}..={MAX_OPSET}; re-export with \
                 an opset in that range (e.g. `torch.onnx.export(..., opset_version=17)`)"
            );
        }
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| anyhow!("the model has no graph"))?;
        if !graph.sparse_initializer.is_empty() {
            bail!("sparse initializers are not supported");
        }

        let mut initializers = Vec::with_capacity(graph.initializer.len());
        let mut defined: HashSet<String> = HashSet::new();
        for t in &graph.initializer {
            if t.name.is_empty() {
                bail!("an initializer has an empty name");
            }
            if !defined.insert(t.name.clone()) {
                bail!("initializer '{}' is defined twice", t.name);
            }
            initializers.push((t.name.clone(), HostTensor::from_proto(t)?));
        }
        let mut inputs = vec![];
        for vi in &graph.input {
            if defined.contains(&vi.name) {
                continue; // an initializer also listed as input (keep_initializers_as_inputs)
            }
            let (elem_type, dims) = match vi.r#type.as_ref().and_then(|t| t.value.as_ref()) {
                Some(pb::type_proto::Value::TensorType(tt)) => (
                    tt.elem_type,
                    tt.shape.as_ref().map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match d.value {
                                Some(pb::tensor_shape_proto::dimension::Value::DimValue(v))
                                    if v > 0 =>
                                {
                                    Some(v)
                                }
                                _ => None,
                            })
                            .collect()
                    }),
                ),
                _ => bail!("graph input '{}' is not a tensor", vi.name),
            };
            if !defined.insert(vi.name.clone()) {
                bail!("graph input '{}' is declared twice", vi.name);
            }
            inputs.push(GraphInput {
                name: vi.name.clone(),
                elem_type,
                dims,
            });
        }

        let mut nodes = Vec::with_capacity(graph.node.len());
        let mut producers: HashMap<String, usize> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            let name = if n.name.is_empty() {
                format!("{}_{i}", n.op_type)
            } else {
                n.name.clone()
            };
            for o in n.output.iter().filter(|o| !o.is_empty()) {
                if defined.contains(o) || producers.insert(o.clone(), i).is_some() {
                    bail!("tensor '{o}' is produced more than once (second time by node '{name}')");
                }
            }
            nodes.push(Node {
                name,
                op: n.op_type.clone(),
                inputs: n.input.clone(),
                outputs: n.output.clone(),
                attrs: n.attribute.clone(),
                domain: if n.domain == "ai.onnx" {
                    String::new()
                } else {
                    n.domain.clone()
                },
            });
        }
        for n in &nodes {
            for inp in n.inputs.iter().filter(|s| !s.is_empty()) {
                if !defined.contains(inp) && !producers.contains_key(inp) {
                    bail!(
                        "{} reads tensor '{inp}', which no node, initializer or input defines",
                        n.describe()
                    );
                }
            }
        }
        let nodes = topo_sort(nodes, &producers)?;
        let mut outputs = vec![];
        let mut seen = HashSet::new();
        for o in &graph.output {
            if !seen.insert(o.name.clone()) {
                bail!("graph output '{}' is listed twice", o.name);
            }
            if !defined.contains(&o.name) && !producers.contains_key(&o.name) {
                bail!("graph output '{}' is never produced", o.name);
            }
            outputs.push(o.name.clone());
        }
        if outputs.is_empty() {
            bail!("the graph has no outputs");
        }
        Ok(Model {
            source: source.to_string(),
            opset,
            nodes,
            initializers,
            inputs,
            outputs,
        })
    }

    pub fn initializer(&self, name: &str) -> Option<&HostTensor> {
        self.initializers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }
}

/// Kahn's algorithm, stable with respect to file order; a cycle is an error naming a node on it.
fn topo_sort(nodes: Vec<Node>, producers: &HashMap<String, usize>) -> Result<Vec<Node>> {
    let n = nodes.len();
    let mut indeg = vec![0usize; n];
    let mut users: Vec<Vec<usize>> = vec![vec![]; n];
    for (i, node) in nodes.iter().enumerate() {
        let mut deps: Vec<usize> = node
            .inputs
            .iter()
            .filter_map(|s| producers.get(s))
            .copied()
            .collect();
        deps.sort_unstable();
        deps.dedup();
        indeg[i] = deps.len();
        for d in deps {
            users[d].push(i);
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &u in &users[i] {
            indeg[u] -= 1;
            if indeg[u] == 0 {
                ready.insert(u);
            }
        }
    }
    if order.len() != n {
        let stuck = (0..n).find(|&i| indeg[i] > 0).unwrap();
        bail!("the graph has a cycle through {}", nodes[stuck].describe());
    }
    let mut slots: Vec<Option<Node>> = nodes.into_iter().map(Some).collect();
    Ok(order
        .into_iter()
        .map(|i| slots[i].take().unwrap())
        .collect())
}
