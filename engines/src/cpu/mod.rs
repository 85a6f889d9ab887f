//! The CPU reference executor: runs a `Graph` node by node in f32.
//!
//! Every faster executor is tested against this one. Values are freed after their last use, so a
//! MuseTalk-size UNet runs in a few GB.

pub mod kernels;

use std::collections::HashMap;
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::graph::{Graph, Op};
use crate::tensor::Tensor;

/// Runs `graph` on named inputs; returns the named outputs in graph order.
pub fn run(graph: &Graph, inputs: &[(&str, &Tensor)]) -> Result<Vec<(String, Tensor)>> {
    let mut last_use = vec![0usize; graph.nodes.len()];
    for (i, n) in graph.nodes.iter().enumerate() {
        for v in &n.inputs {
            last_use[v.0 as usize] = i;
        }
    }
    for (_, v) in &graph.outputs {
        last_use[v.0 as usize] = usize::MAX;
    }
    let fed: HashMap<&str, &Tensor> = inputs.iter().copied().collect();
    let mut values: Vec<Option<Arc<Tensor>>> = vec![None; graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        let value = match &node.op {
            Op::Input => {
                let t = fed
                    .get(node.name.as_str())
                    .ok_or_else(|| EngineError::Input {
                        name: node.name.clone(),
                        expected: node.shape.clone(),
                        got: vec![],
                    })?;
                if t.shape != node.shape {
                    return Err(EngineError::Input {
                        name: node.name.clone(),
                        expected: node.shape.clone(),
                        got: t.shape.clone(),
                    });
                }
                Arc::new((*t).clone())
            }
            Op::Const(t) => t.clone(),
            op => {
                let args: Vec<&Tensor> = node
                    .inputs
                    .iter()
                    .map(|v| {
                        values[v.0 as usize]
                            .as_deref()
                            .expect("inputs are computed before use")
                    })
                    .collect();
                Arc::new(kernels::eval(op, &args, &node.shape))
            }
        };
        values[i] = Some(value);
        for v in &node.inputs {
            if last_use[v.0 as usize] == i {
                values[v.0 as usize] = None;
            }
        }
    }
    Ok(graph
        .outputs
        .iter()
        .map(|(name, v)| {
            let t = values[v.0 as usize]
                .as_deref()
                .cloned()
                .expect("outputs are kept");
            (name.clone(), t)
        })
        .collect())
}
