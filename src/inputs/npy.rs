//! Minimal `.npy` reader/writer (format versions 1–3, little-endian, C order): float32,
//! float64, int64, int32 and uint8 in; float32, float64 and int64 out. Small enough that a
//! dependency pinned to one ndarray version is not worth it.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, IxDyn};

use crate::onnx::HostTensor;

fn parse_header(h: &str) -> Result<(String, bool, Vec<usize>)> {
    let field = |key: &str| -> Result<&str> {
        let k = format!("'{key}'");
        let at = h.find(&k).ok_or_else(|| anyhow!("header has no {k}"))?;
        Ok(h[at + k.len()..]
            .trim_start()
            .trim_start_matches(':')
            .trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.trim_start_matches(['\'', '"']);
    let descr = descr[..descr
        .find(['\'', '"'])
        .ok_or_else(|| anyhow!("bad descr"))?]
        .to_string();
    let fortran = field("fortran_order")?.starts_with("True");
    let shape = field("shape")?;
    let shape = &shape[1..shape.find(')').ok_or_else(|| anyhow!("bad shape"))?];
    let dims = shape
        .split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| anyhow!("bad dimension '{s}'"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((descr, fortran, dims))
}

pub fn read(path: &Path) -> Result<HostTensor> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = vec![];
    f.read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{} is not a readable .npy file", path.display()))
}

pub fn parse(bytes: &[u8]) -> Result<HostTensor> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("missing the NUMPY magic bytes");
    }
    let (hlen, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                bail!("truncated header");
            }
            (
                u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
                12,
            )
        }
        v => bail!("unsupported .npy version {v}"),
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| anyhow!("truncated header"))?;
    let header = std::str::from_utf8(&bytes[start..end])?;
    let (descr, fortran, dims) = parse_header(header)?;
    if fortran {
        bail!("Fortran-order arrays are not supported; save with np.ascontiguousarray");
    }
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow!("shape overflows"))?;
    let data = &bytes[end..];
    let width = match descr.as_str() {
        "<f4" | "<i4" => 4,
        "<f8" | "<i8" => 8,
        "|u1" | "<u1" | "|b1" => 1,
        other => bail!("unsupported dtype '{other}' (use float32, float64, int64, int32 or uint8)"),
    };
    if data.len() != numel * width {
        bail!(
            "header says {numel} elements of {width} bytes but the file holds {} bytes of data",
            data.len()
        );
    }
    let ix = IxDyn(&dims);
    Ok(match descr.as_str() {
        "<f4" => HostTensor::F32(ArrayD::from_shape_vec(
            ix,
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )?),
        "<f8" => HostTensor::F64(ArrayD::from_shape_vec(
            ix,
            data.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )?),
        "<i8" => HostTensor::I64(ArrayD::from_shape_vec(
            ix,
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )?),
        "<i4" => HostTensor::I64(ArrayD::from_shape_vec(
            ix,
            data.chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        )?),
        _ => HostTensor::I64(ArrayD::from_shape_vec(
            ix,
            data.iter().map(|&b| b as i64).collect(),
        )?),
    })
}

fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    let total = 10 + h.len() + 1;
    h.push_str(&" ".repeat((64 - total % 64) % 64));
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out
}

/// Encode values little-endian into `w` through a fixed buffer (no full-size copy).
fn write_le<T: Copy, const W: usize>(
    w: &mut impl Write,
    vals: impl Iterator<Item = T>,
    enc: fn(T) -> [u8; W],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    for v in vals {
        buf.extend_from_slice(&enc(v));
        if buf.len() >= (1 << 20) {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)
}

/// Write an array; the file appears complete or not at all (written aside, then renamed).
pub fn write(path: &Path, t: &HostTensor) -> Result<()> {
    let descr = match t {
        HostTensor::F32(_) => "<f4",
        HostTensor::F64(_) => "<f8",
        HostTensor::I64(_) => "<i8",
        HostTensor::Bool(_) => "|b1",
    };
    let tmp = path.with_extension("npy.partial");
    let res = (|| -> Result<()> {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        f.write_all(&header(descr, &t.shape()))?;
        match t {
            HostTensor::F32(a) => write_le(&mut f, a.iter().copied(), f32::to_le_bytes)?,
            HostTensor::F64(a) => write_le(&mut f, a.iter().copied(), f64::to_le_bytes)?,
            HostTensor::I64(a) => write_le(&mut f, a.iter().copied(), i64::to_le_bytes)?,
            HostTensor::Bool(a) => write_le(&mut f, a.iter().map(|&v| v as u8), u8::to_le_bytes)?,
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_i64() {
        let dir = std::env::temp_dir().join(format!("gradalign-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = HostTensor::F32(
            ArrayD::from_shape_vec(IxDyn(&[2, 3]), vec![1.0, 2.5, -3.0, 0.0, 1e-8, 7.0]).unwrap(),
        );
        write(&dir.join("a.npy"), &a).unwrap();
        assert_eq!(read(&dir.join("a.npy")).unwrap(), a);
        let b = HostTensor::i64_vec(&[3, 1, 4, 1, 5]);
        write(&dir.join("b.npy"), &b).unwrap();
        assert_eq!(read(&dir.join("b.npy")).unwrap(), b);
        // 64-byte aligned header, as numpy writes it.
        let bytes = std::fs::read(dir.join("b.npy")).unwrap();
        assert_eq!((bytes.len() - 5 * 8) % 64, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_data_is_rejected() {
        let mut bytes = header("<f4", &[4]);
        bytes.extend([0u8; 12]);
        let e = parse(&bytes).unwrap_err().to_string();
        assert!(e.contains("4 elements"), "{e}");
    }
}
