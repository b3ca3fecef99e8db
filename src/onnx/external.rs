//! ONNX external data (`data_location = EXTERNAL`): initializer bytes kept in a file next to the
//! model. A model file comes from anywhere, so the location is untrusted: it must name a file
//! inside the model's folder (no absolute paths, no `..`, no symlink leading out), and the
//! offset/length must lie within that file.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use anyhow::{anyhow, bail, Context, Result};

use super::pb;

const EXTERNAL: i32 = 1;

/// Replace `t`'s external reference with the bytes it points to (`raw_data`), after checking it.
pub fn resolve(t: &mut pb::TensorProto, model_path: &Path) -> Result<()> {
    if t.data_location != Some(EXTERNAL) && t.external_data.is_empty() {
        return Ok(());
    }
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.clone())
    };
    let location = get("location")
        .ok_or_else(|| anyhow!("tensor {:?}: external_data without a 'location'", t.name))?;
    let num = |k: &str| -> Result<Option<u64>> {
        get(k)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    anyhow!(
                        "tensor {:?}: external_data {k} '{v}' is not a number",
                        t.name
                    )
                })
            })
            .transpose()
    };
    let offset = num("offset")?.unwrap_or(0);
    let length = num("length")?;
    let rel = Path::new(&location);
    if rel.as_os_str().is_empty()
        || rel
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        bail!(
            "tensor {:?}: external data location '{location}' leaves the model's folder (absolute \
             paths and '..' are refused); keep the data file next to the model",
            t.name
        );
    }
    let dir = model_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file = dir.join(rel);
    let real = file.canonicalize().with_context(|| {
        format!(
            "tensor {:?}: external data file {} cannot be opened",
            t.name,
            file.display()
        )
    })?;
    let real_dir = dir.canonicalize()?;
    if !real.starts_with(&real_dir) {
        bail!(
            "tensor {:?}: external data file {} resolves to {}, outside the model's folder; refused",
            t.name,
            file.display(),
            real.display()
        );
    }
    let mut f = std::fs::File::open(&real)
        .with_context(|| format!("tensor {:?}: cannot open {}", t.name, real.display()))?;
    let size = f.metadata()?.len();
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) {
        bail!(
            "tensor {:?}: external data asks for bytes {offset}..{offset}+{length} of {}, which holds {size}",
            t.name,
            file.display()
        );
    }
    // Check against the declared shape before allocating anything.
    let elem = match t.data_type {
        1 | 6 | 12 => 4,      // float, int32, uint32
        11 | 7 | 13 => 8,     // double, int64, uint64
        2 | 3 | 9 => 1,       // uint8, int8, bool
        4 | 5 | 10 | 16 => 2, // uint16, int16, float16, bfloat16
        other => bail!(
            "tensor {:?}: external data of element type {other} is not supported",
            t.name
        ),
    };
    let declared = t.dims.iter().try_fold(elem as u64, |a, &d| {
        u64::try_from(d).ok().and_then(|d| a.checked_mul(d))
    });
    if declared != Some(length) {
        bail!(
            "tensor {:?}: dims {:?} need {} bytes but its external data holds {length}",
            t.name,
            t.dims,
            declared.map_or("more than 2^64".into(), |d| d.to_string())
        );
    }
    f.seek(SeekFrom::Start(offset))?;
    let mut raw = vec![0u8; length as usize];
    f.read_exact(&mut raw)
        .with_context(|| format!("tensor {:?}: reading {}", t.name, file.display()))?;
    t.raw_data = raw;
    t.external_data.clear();
    t.data_location = None;
    Ok(())
}
