//! Host-side tensors: initializers, folded constants and the small arrays the builder emits.

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};

use super::pb;

/// ONNX `TensorProto.DataType` codes we handle.
pub const FLOAT: i32 = 1;
pub const INT32: i32 = 6;
pub const INT64: i32 = 7;
pub const BOOL: i32 = 9;
pub const DOUBLE: i32 = 11;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    I64,
    Bool,
}

impl DType {
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => FLOAT,
            DType::F64 => DOUBLE,
            DType::I64 => INT64,
            DType::Bool => BOOL,
        }
    }
    pub fn from_onnx(code: i32) -> Option<DType> {
        match code {
            FLOAT => Some(DType::F32),
            DOUBLE => Some(DType::F64),
            INT64 | INT32 => Some(DType::I64),
            BOOL => Some(DType::Bool),
            _ => None,
        }
    }
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
}

/// Name of an ONNX data type code, for error messages.
pub fn onnx_type_name(code: i32) -> &'static str {
    match code {
        0 => "UNDEFINED",
        1 => "FLOAT",
        2 => "UINT8",
        3 => "INT8",
        4 => "UINT16",
        5 => "INT16",
        6 => "INT32",
        7 => "INT64",
        8 => "STRING",
        9 => "BOOL",
        10 => "FLOAT16",
        11 => "DOUBLE",
        12 => "UINT32",
        13 => "UINT64",
        16 => "BFLOAT16",
        _ => "unknown",
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I64(ArrayD<i64>),
    Bool(ArrayD<bool>),
}

impl HostTensor {
    pub fn dtype(&self) -> DType {
        match self {
            HostTensor::F32(_) => DType::F32,
            HostTensor::F64(_) => DType::F64,
            HostTensor::I64(_) => DType::I64,
            HostTensor::Bool(_) => DType::Bool,
        }
    }
    pub fn shape(&self) -> Vec<usize> {
        match self {
            HostTensor::F32(a) => a.shape().to_vec(),
            HostTensor::F64(a) => a.shape().to_vec(),
            HostTensor::I64(a) => a.shape().to_vec(),
            HostTensor::Bool(a) => a.shape().to_vec(),
        }
    }
    pub fn len(&self) -> usize {
        self.shape().iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Integer view (shape constants, axes, indices).
    pub fn as_i64_vec(&self) -> Result<Vec<i64>> {
        Ok(match self {
            HostTensor::I64(a) => a.iter().copied().collect(),
            HostTensor::F32(a) => a.iter().map(|&v| v as i64).collect(),
            HostTensor::F64(a) => a.iter().map(|&v| v as i64).collect(),
            HostTensor::Bool(a) => a.iter().map(|&v| v as i64).collect(),
        })
    }
    /// Float view, widened to f64.
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            HostTensor::F32(a) => a.mapv(|v| v as f64),
            HostTensor::F64(a) => a.clone(),
            HostTensor::I64(a) => a.mapv(|v| v as f64),
            HostTensor::Bool(a) => a.mapv(|v| v as u8 as f64),
        }
    }
    /// The values as float64, row-major.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match self.cast(DType::F64) {
            HostTensor::F64(a) => a.iter().copied().collect(),
            _ => unreachable!("cast to f64 gives F64"),
        }
    }

    pub fn cast(&self, to: DType) -> HostTensor {
        match to {
            DType::F32 => HostTensor::F32(self.to_f64().mapv(|v| v as f32)),
            DType::F64 => HostTensor::F64(self.to_f64()),
            DType::I64 => HostTensor::I64(match self {
                HostTensor::I64(a) => a.clone(),
                other => other.to_f64().mapv(|v| v as i64),
            }),
            DType::Bool => HostTensor::Bool(self.to_f64().mapv(|v| v != 0.0)),
        }
    }
    pub fn scalar_f64(&self) -> Option<f64> {
        if self.len() == 1 {
            self.to_f64().iter().next().copied()
        } else {
            None
        }
    }
    pub fn i64_vec(v: &[i64]) -> HostTensor {
        HostTensor::I64(ArrayD::from_shape_vec(IxDyn(&[v.len()]), v.to_vec()).unwrap())
    }

    pub fn from_proto(t: &pb::TensorProto) -> Result<HostTensor> {
        if t.data_location == Some(1) || !t.external_data.is_empty() {
            bail!(
                "tensor {:?} stores its data externally (external_data); gradalign reads self-contained \
                 models only — re-save the model with `onnx.save(model, path, save_as_external_data=False)`",
                t.name
            );
        }
        let mut shape = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            if d < 0 {
                bail!("tensor {:?} has a negative dimension {d}", t.name);
            }
            shape.push(d as usize);
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .with_context(|| format!("tensor {:?}: dimensions {:?} overflow", t.name, t.dims))?;
        let raw = &t.raw_data;
        let check = |got: usize| -> Result<()> {
            if got != numel {
                bail!(
                    "tensor {:?} declares shape {:?} ({} elements) but holds {} values",
                    t.name,
                    t.dims,
                    numel,
                    got
                );
            }
            Ok(())
        };
        let ix = IxDyn(&shape);
        Ok(match t.data_type {
            FLOAT => {
                let v: Vec<f32> = if !raw.is_empty() {
                    check(raw.len() / 4)?;
                    raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
                } else {
                    t.float_data.clone()
                };
                check(v.len())?;
                HostTensor::F32(ArrayD::from_shape_vec(ix, v)?)
            }
            DOUBLE => {
                let v: Vec<f64> = if !raw.is_empty() {
                    check(raw.len() / 8)?;
                    raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
                } else {
                    t.double_data.clone()
                };
                check(v.len())?;
                HostTensor::F64(ArrayD::from_shape_vec(ix, v)?)
            }
            INT64 => {
                let v: Vec<i64> = if !raw.is_empty() {
                    check(raw.len() / 8)?;
                    raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
                } else {
                    t.int64_data.clone()
                };
                check(v.len())?;
                HostTensor::I64(ArrayD::from_shape_vec(ix, v)?)
            }
            INT32 => {
                let v: Vec<i64> = if !raw.is_empty() {
                    check(raw.len() / 4)?;
                    raw.chunks_exact(4)
                        .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                        .collect()
                } else {
                    t.int32_data.iter().map(|&v| v as i64).collect()
                };
                check(v.len())?;
                HostTensor::I64(ArrayD::from_shape_vec(ix, v)?)
            }
            BOOL => {
                let v: Vec<bool> = if !raw.is_empty() {
                    raw.iter().map(|&b| b != 0).collect()
                } else {
                    t.int32_data.iter().map(|&v| v != 0).collect()
                };
                check(v.len())?;
                HostTensor::Bool(ArrayD::from_shape_vec(ix, v)?)
            }
            other => bail!(
                "tensor {:?} has data type {} ({other}); gradalign handles FLOAT, DOUBLE, INT64, INT32 and BOOL",
                t.name,
                onnx_type_name(other)
            ),
        })
    }

    pub fn to_proto(&self, name: &str) -> pb::TensorProto {
        let dims: Vec<i64> = self.shape().iter().map(|&d| d as i64).collect();
        let (data_type, raw_data): (i32, Vec<u8>) = match self {
            HostTensor::F32(a) => (FLOAT, a.iter().flat_map(|v| v.to_le_bytes()).collect()),
            HostTensor::F64(a) => (DOUBLE, a.iter().flat_map(|v| v.to_le_bytes()).collect()),
            HostTensor::I64(a) => (INT64, a.iter().flat_map(|v| v.to_le_bytes()).collect()),
            HostTensor::Bool(a) => (BOOL, a.iter().map(|&v| v as u8).collect()),
        };
        pb::TensorProto {
            name: name.to_string(),
            dims,
            data_type,
            raw_data,
            ..Default::default()
        }
    }
}

/// A tensor type and fixed shape as ONNX declares a graph input or output.
pub fn value_info(name: &str, dtype: DType, shape: &[usize]) -> crate::onnx::pb::ValueInfoProto {
    use crate::onnx::pb::tensor_shape_proto::{dimension::Value, Dimension};
    crate::onnx::pb::ValueInfoProto {
        name: name.to_string(),
        r#type: Some(crate::onnx::pb::TypeProto {
            value: Some(crate::onnx::pb::type_proto::Value::TensorType(
                crate::onnx::pb::type_proto::Tensor {
                    elem_type: dtype.onnx_code(),
                    shape: Some(crate::onnx::pb::TensorShapeProto {
                        dim: shape
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(Value::DimValue(d as i64)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_round_trip_keeps_values_and_shape() {
        let t = HostTensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1., -2., 3.5, 0., 7., -0.25]).unwrap(),
        );
        let back = HostTensor::from_proto(&t.to_proto("w")).unwrap();
        assert_eq!(back, t);
        let i = HostTensor::i64_vec(&[3, -1, 9]);
        assert_eq!(HostTensor::from_proto(&i.to_proto("s")).unwrap(), i);
    }

    #[test]
    fn size_mismatch_is_an_error_naming_the_tensor() {
        let mut p = HostTensor::i64_vec(&[1, 2]).to_proto("shape_c");
        p.dims = vec![3];
        let e = HostTensor::from_proto(&p).unwrap_err().to_string();
        assert!(e.contains("shape_c") && e.contains("3 elements"), "{e}");
    }
}
