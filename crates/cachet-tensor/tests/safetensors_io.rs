//! Integration tests of the safetensors reader and writer: round trips, dtype conversion on load,
//! cross-checks against the reference `safetensors` crate, sharded checkpoints, and a suite of
//! malformed files that must each fail with a specific, well-named error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use cachet_tensor::safetensors::{Checkpoint, SafetensorsError, StoredDType, save, save_tensors};
use half::{bf16, f16};

fn device() -> Device {
    Device::flex()
}

fn f32_values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32) * 0.377 + seed).sin() * 3.5)
        .collect()
}

fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A raw safetensors file: 8-byte little-endian header length, header, data.
fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn floats_of(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().try_to_vec::<f32>().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn round_trip_all_dtypes_and_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let dev = device();

    let w1 = f32_values(5, 0.1);
    let w2 = f32_values(12, 0.2);
    let w3 = f32_values(24, 0.3);
    let w4 = f32_values(48, 0.4);
    let h2: Vec<f16> = f32_values(6, 0.5).into_iter().map(f16::from_f32).collect();
    let b3: Vec<bf16> = f32_values(8, 0.6).into_iter().map(bf16::from_f32).collect();
    let ids: Vec<i64> = vec![-3, 0, 7, i64::from(i32::MAX) + 5, 42, -1];
    let small_ids: Vec<i64> = vec![-3, 0, 7, 1 << 20, 42, -1];

    let tensors = vec![
        ("r1.f32".to_owned(), TensorData::new(w1.clone(), [5])),
        ("r2.f32".to_owned(), TensorData::new(w2.clone(), [3, 4])),
        ("r3.f32".to_owned(), TensorData::new(w3.clone(), [2, 3, 4])),
        (
            "r4.f32".to_owned(),
            TensorData::new(w4.clone(), [2, 2, 3, 4]),
        ),
        ("h.f16".to_owned(), TensorData::new(h2.clone(), [2, 3])),
        ("b.bf16".to_owned(), TensorData::new(b3.clone(), [2, 2, 2])),
        ("ids.i64".to_owned(), TensorData::new(ids.clone(), [6])),
        (
            "ids2.i64".to_owned(),
            TensorData::new(small_ids.clone(), [1, 2, 1, 3]),
        ),
    ];
    let metadata = meta(&[("format", "pt"), ("note", "round trip")]);
    save(&path, &tensors, Some(&metadata)).unwrap();

    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(
        ckpt.names(),
        vec![
            "b.bf16", "h.f16", "ids.i64", "ids2.i64", "r1.f32", "r2.f32", "r3.f32", "r4.f32"
        ]
    );
    assert_eq!(ckpt.metadata(), &metadata);
    assert!(ckpt.contains("r3.f32"));
    assert!(!ckpt.contains("nope"));
    assert_eq!(ckpt.len(), 8);
    let info = ckpt.info("r3.f32").unwrap();
    assert_eq!(info.dtype, StoredDType::F32);
    assert_eq!(info.shape, vec![2, 3, 4]);
    assert_eq!(info.byte_len(), 24 * 4);
    let expected_total: usize = tensors
        .iter()
        .map(|(_, d)| d.num_elements() * d.dtype().size())
        .sum();
    assert_eq!(ckpt.total_bytes(), expected_total as u64);

    // Host copies are bit-identical to what was saved.
    for (name, data) in &tensors {
        assert_eq!(&ckpt.tensor_data(name).unwrap(), data, "{name}");
    }

    // Device loads at each rank.
    let t1: Tensor<1> = ckpt.load_float("r1.f32", &dev, DType::F32).unwrap();
    assert_eq!(t1.dims(), [5]);
    assert_eq!(t1.into_data().try_to_vec::<f32>().unwrap(), w1);
    let t2: Tensor<2> = ckpt.load_float("r2.f32", &dev, DType::F32).unwrap();
    assert_eq!(t2.dims(), [3, 4]);
    assert_eq!(t2.into_data().try_to_vec::<f32>().unwrap(), w2);
    let t3: Tensor<3> = ckpt.load_float("r3.f32", &dev, DType::F32).unwrap();
    assert_eq!(t3.dims(), [2, 3, 4]);
    assert_eq!(t3.into_data().try_to_vec::<f32>().unwrap(), w3);
    let t4: Tensor<4> = ckpt.load_float("r4.f32", &dev, DType::F32).unwrap();
    assert_eq!(t4.dims(), [2, 2, 3, 4]);
    assert_eq!(t4.into_data().try_to_vec::<f32>().unwrap(), w4);

    let th: Tensor<2> = ckpt.load_float("h.f16", &dev, DType::F16).unwrap();
    assert_eq!(th.dtype(), DType::F16);
    assert_eq!(th.into_data().try_to_vec::<f16>().unwrap(), h2);
    let tb: Tensor<3> = ckpt.load_float("b.bf16", &dev, DType::BF16).unwrap();
    assert_eq!(tb.dtype(), DType::BF16);
    assert_eq!(tb.into_data().try_to_vec::<bf16>().unwrap(), b3);

    let int_dtype: DType = dev.settings().int_dtype.into();
    if int_dtype == DType::I64 {
        let ti: Tensor<1, Int> = ckpt.load_int("ids.i64", &dev).unwrap();
        assert_eq!(ti.dims(), [6]);
        let got = ti.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
        assert_eq!(got, ids);
    } else {
        // A narrower device int dtype refuses values it cannot hold with a typed error.
        let err = ckpt.load_int::<1>("ids.i64", &dev).unwrap_err();
        assert!(
            matches!(&err, SafetensorsError::ValueOutOfRange { index: 3, tensor, .. } if tensor == "ids.i64"),
            "{err:?}"
        );
        assert!(err.to_string().contains("model.safetensors"), "{err}");
    }
    let ti4: Tensor<4, Int> = ckpt.load_int("ids2.i64", &dev).unwrap();
    assert_eq!(ti4.dims(), [1, 2, 1, 3]);
    assert_eq!(
        ti4.into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap(),
        small_ids
    );
}

#[test]
fn conversion_on_load_matches_half() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("convert.safetensors");
    let dev = device();
    let mut values = f32_values(64, 1.3);
    values.extend([0.0, -0.0, 1.0e-6, 65504.0, 1.0e5, -7.123_456_7, 1.0 / 3.0]);
    let n = values.len();
    let bf: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    let h: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
    let d: Vec<f64> = values.iter().map(|&v| f64::from(v) * 1.000_000_1).collect();
    save(
        &path,
        &[
            ("f32".to_owned(), TensorData::new(values.clone(), [n])),
            ("bf16".to_owned(), TensorData::new(bf.clone(), [n])),
            ("f16".to_owned(), TensorData::new(h.clone(), [n])),
            ("f64".to_owned(), TensorData::new(d.clone(), [n])),
        ],
        None,
    )
    .unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert!(ckpt.metadata().is_empty());

    // f32 -> f16 rounds exactly as `half` does, and f16 -> f32 is exact.
    let as_f16: Tensor<1> = ckpt.load_float("f32", &dev, DType::F16).unwrap();
    assert_eq!(as_f16.dtype(), DType::F16);
    let got = as_f16.into_data().try_to_vec::<f16>().unwrap();
    for (i, (g, v)) in got.iter().zip(&values).enumerate() {
        assert_eq!(
            g.to_bits(),
            f16::from_f32(*v).to_bits(),
            "element {i} ({v})"
        );
    }
    let back: Tensor<1> = ckpt.load_float("f16", &dev, DType::F32).unwrap();
    let back = back.into_data().try_to_vec::<f32>().unwrap();
    let expect: Vec<f32> = values.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(back, expect);

    // bf16 -> f32 is exact; f32 -> bf16 rounds as `half` does.
    let from_bf: Tensor<1> = ckpt.load_float("bf16", &dev, DType::F32).unwrap();
    let from_bf = from_bf.into_data().try_to_vec::<f32>().unwrap();
    let expect: Vec<f32> = bf.iter().map(|v| v.to_f32()).collect();
    assert_eq!(from_bf, expect);
    let to_bf: Tensor<1> = ckpt.load_float("f32", &dev, DType::BF16).unwrap();
    let to_bf = to_bf.into_data().try_to_vec::<bf16>().unwrap();
    assert_eq!(to_bf, bf);

    // f64 -> f32.
    let from_d: Tensor<1> = ckpt.load_float("f64", &dev, DType::F32).unwrap();
    let from_d = from_d.into_data().try_to_vec::<f32>().unwrap();
    let expect: Vec<f32> = d.iter().map(|&v| v as f32).collect();
    assert_eq!(from_d, expect);
}

#[test]
fn save_tensors_from_device_and_overwrite_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let dev = device();
    let a = Tensor::<2>::from_data(TensorData::new(f32_values(6, 0.0), [2, 3]), &dev);
    let b = Tensor::<2>::from_data(TensorData::new(f32_values(4, 9.0), [2, 2]), &dev);
    save_tensors(
        &path,
        vec![("a".to_owned(), a.clone()), ("b".to_owned(), b.clone())],
        Some(&meta(&[("k", "v")])),
    )
    .unwrap();
    // Overwrite the same path with different content: the new file replaces the old.
    save_tensors(&path, vec![("c".to_owned(), b)], None).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.names(), vec!["c"]);
    let c: Tensor<2> = ckpt.load_float("c", &dev, DType::F32).unwrap();
    assert_eq!(floats_of(c.into_data()), f32_values(4, 9.0));
    // No temporary files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec!["weights.safetensors".to_owned()]);

    // Int tensors save too.
    let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 2, 3], [3]), &dev);
    let ipath = dir.path().join("ids.safetensors");
    save_tensors(&ipath, vec![("ids".to_owned(), ids)], None).unwrap();
    let ckpt = Checkpoint::open(&ipath).unwrap();
    let ids: Tensor<1, Int> = ckpt.load_int("ids", &dev).unwrap();
    assert_eq!(
        ids.into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap(),
        vec![1, 2, 3]
    );
}

#[test]
fn header_is_padded_and_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pad.safetensors");
    save(
        &path,
        &[
            ("zeta".to_owned(), TensorData::new(vec![1u8, 2, 3], [3])),
            ("alpha".to_owned(), TensorData::new(vec![1.5f32], [1])),
        ],
        None,
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0, "header length is a multiple of 8");
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    assert!(header.trim_end().ends_with('}'));
    assert!(header[header.trim_end().len()..].bytes().all(|b| b == b' '));
    assert!(header.find("\"alpha\"").unwrap() < header.find("\"zeta\"").unwrap());
    assert_eq!(bytes.len(), 8 + n + 4 + 3);
}

#[test]
fn bool_u8_and_small_ints_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ints.safetensors");
    let dev = device();
    let tensors = vec![
        (
            "mask".to_owned(),
            TensorData::new(vec![true, false, true, true], [2, 2]),
        ),
        ("u8".to_owned(), TensorData::new(vec![0u8, 255, 7], [3])),
        ("i8".to_owned(), TensorData::new(vec![-128i8, 127, 0], [3])),
        ("i16".to_owned(), TensorData::new(vec![-300i16, 300], [2])),
        ("u16".to_owned(), TensorData::new(vec![60000u16, 1], [2])),
        ("i32".to_owned(), TensorData::new(vec![-70000i32, 5], [2])),
        ("u32".to_owned(), TensorData::new(vec![70000u32, 5], [2])),
        ("u64".to_owned(), TensorData::new(vec![9u64, 5], [2])),
        ("big".to_owned(), TensorData::new(vec![1u64, u64::MAX], [2])),
    ];
    save(&path, &tensors, None).unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.info("mask").unwrap().dtype, StoredDType::BOOL);
    for (name, data) in &tensors {
        assert_eq!(&ckpt.tensor_data(name).unwrap(), data, "{name}");
    }
    let mask: Tensor<2, Int> = ckpt.load_int("mask", &dev).unwrap();
    assert_eq!(
        mask.into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap(),
        vec![1, 0, 1, 1]
    );
    let i16s: Tensor<1, Int> = ckpt.load_int("i16", &dev).unwrap();
    assert_eq!(
        i16s.into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap(),
        vec![-300, 300]
    );
    let u64s: Tensor<1, Int> = ckpt.load_int("u64", &dev).unwrap();
    assert_eq!(
        u64s.into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap(),
        vec![9, 5]
    );
    // u64::MAX fits no device int dtype: a typed error, not a panic.
    let err = ckpt.load_int::<1>("big", &dev).unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::ValueOutOfRange { index: 1, value, .. } if *value == i128::from(u64::MAX)),
        "{err:?}"
    );
    assert!(err.to_string().contains("ints.safetensors"), "{err}");
    let u8s: Tensor<1, Int> = ckpt.load_int("u8", &dev).unwrap();
    assert_eq!(
        u8s.into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap(),
        vec![0, 255, 7]
    );
}

#[test]
fn from_bytes_and_unaligned_data() {
    // A one-byte tensor first leaves the f32 tensor at an odd offset.
    let mut data = vec![9u8];
    for v in [1.25f32, -2.5] {
        data.extend_from_slice(&v.to_le_bytes());
    }
    let header = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}}"#;
    let bytes = raw_file(header, &data);
    let ckpt = Checkpoint::from_bytes("embedded.safetensors", bytes.clone()).unwrap();
    let b: Tensor<1> = ckpt.load_float("b", &device(), DType::F32).unwrap();
    assert_eq!(b.into_data().try_to_vec::<f32>().unwrap(), vec![1.25, -2.5]);
    assert_eq!(
        ckpt.tensor_data("a").unwrap().try_to_vec::<u8>().unwrap(),
        vec![9]
    );
    assert_eq!(ckpt.file_of("b"), Some("embedded.safetensors"));

    // Static bytes work too (as with include_bytes!).
    let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    let ckpt = Checkpoint::from_bytes("static.safetensors", leaked).unwrap();
    assert_eq!(ckpt.names(), vec!["a", "b"]);

    // An empty checkpoint is valid; a scalar has shape [].
    let ckpt = Checkpoint::from_bytes("empty.safetensors", raw_file("{}", &[])).unwrap();
    assert!(ckpt.is_empty());
    assert_eq!(ckpt.total_bytes(), 0);
    let scalar = raw_file(
        r#"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
        &3.0f32.to_le_bytes(),
    );
    let ckpt = Checkpoint::from_bytes("scalar.safetensors", scalar).unwrap();
    let s = ckpt.tensor_data("s").unwrap();
    assert_eq!(s.shape().as_slice(), &[] as &[usize]);
    assert_eq!(s.try_to_vec::<f32>().unwrap(), vec![3.0]);
}

// ---------------------------------------------------------------------------------------------
// Cross-checks with the reference implementation
// ---------------------------------------------------------------------------------------------

#[test]
fn reads_files_written_by_reference_crate() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<f32> = f32_values(6, 2.0);
    let w_bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let h: Vec<f16> = f32_values(4, 3.0).into_iter().map(f16::from_f32).collect();
    let h_bytes: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
    let ids: Vec<i64> = vec![5, -6, 7];
    let id_bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (
            "w",
            TensorView::new(safetensors::Dtype::F32, vec![2, 3], &w_bytes).unwrap(),
        ),
        (
            "h",
            TensorView::new(safetensors::Dtype::F16, vec![4], &h_bytes).unwrap(),
        ),
        (
            "ids",
            TensorView::new(safetensors::Dtype::I64, vec![3], &id_bytes).unwrap(),
        ),
    ];
    let info = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = safetensors::serialize(views, Some(info)).unwrap();
    let path = write(dir.path(), "reference.safetensors", &bytes);

    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.names(), vec!["h", "ids", "w"]);
    assert_eq!(ckpt.metadata(), &meta(&[("format", "pt")]));
    let dev = device();
    let wt: Tensor<2> = ckpt.load_float("w", &dev, DType::F32).unwrap();
    assert_eq!(wt.into_data().try_to_vec::<f32>().unwrap(), w);
    assert_eq!(
        ckpt.tensor_data("h").unwrap().try_to_vec::<f16>().unwrap(),
        h
    );
    assert_eq!(
        ckpt.tensor_data("ids")
            .unwrap()
            .try_to_vec::<i64>()
            .unwrap(),
        ids
    );
}

#[test]
fn reference_crate_reads_our_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ours.safetensors");
    let w = f32_values(6, 4.0);
    let b: Vec<bf16> = f32_values(3, 5.0).into_iter().map(bf16::from_f32).collect();
    save(
        &path,
        &[
            ("w".to_owned(), TensorData::new(w.clone(), [3, 2])),
            ("b".to_owned(), TensorData::new(b.clone(), [3])),
            ("m".to_owned(), TensorData::new(vec![true, false], [2])),
            ("n".to_owned(), TensorData::new(vec![3i32], [1])),
        ],
        Some(&meta(&[("format", "pt")])),
    )
    .unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, vec!["b", "m", "n", "w"]);
    let wv = st.tensor("w").unwrap();
    assert_eq!(wv.dtype(), safetensors::Dtype::F32);
    assert_eq!(wv.shape(), &[3, 2]);
    let expect: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(wv.data(), expect.as_slice());
    let bv = st.tensor("b").unwrap();
    assert_eq!(bv.dtype(), safetensors::Dtype::BF16);
    let expect: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(bv.data(), expect.as_slice());
    let mv = st.tensor("m").unwrap();
    assert_eq!(mv.dtype(), safetensors::Dtype::BOOL);
    assert_eq!(mv.data(), &[1, 0]);
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        metadata
            .metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints
// ---------------------------------------------------------------------------------------------

const SHARD1: &str = "model-00001-of-00002.safetensors";
const SHARD2: &str = "model-00002-of-00002.safetensors";

/// Writes two shards (a, b | c) and returns the total stored size.
fn write_shards(dir: &Path) -> usize {
    save(
        dir.join(SHARD1),
        &[
            ("a".to_owned(), TensorData::new(f32_values(4, 0.0), [2, 2])),
            ("b".to_owned(), TensorData::new(vec![1i64, 2, 3], [3])),
        ],
        Some(&meta(&[("format", "pt")])),
    )
    .unwrap();
    save(
        dir.join(SHARD2),
        &[("c".to_owned(), TensorData::new(f32_values(6, 1.0), [6]))],
        Some(&meta(&[("format", "pt")])),
    )
    .unwrap();
    4 * 4 + 3 * 8 + 6 * 4
}

fn write_index(dir: &Path, total: usize, map: &[(&str, &str)]) -> PathBuf {
    let weight_map: serde_json::Map<String, serde_json::Value> = map
        .iter()
        .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
        .collect();
    let index = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap()).unwrap();
    path
}

#[test]
fn sharded_checkpoint_via_dir_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let total = write_shards(dir.path());
    let index = write_index(
        dir.path(),
        total,
        &[("a", SHARD1), ("b", SHARD1), ("c", SHARD2)],
    );
    // A stray single file must not win over the index.
    save(
        dir.path().join("model.safetensors"),
        &[("stray".to_owned(), TensorData::new(vec![0f32], [1]))],
        None,
    )
    .unwrap();
    let dev = device();
    for ckpt in [
        Checkpoint::open(dir.path()).unwrap(),
        Checkpoint::open(&index).unwrap(),
    ] {
        assert_eq!(ckpt.names(), vec!["a", "b", "c"]);
        assert_eq!(ckpt.total_bytes(), total as u64);
        assert_eq!(
            ckpt.metadata().get("format").map(String::as_str),
            Some("pt")
        );
        assert_eq!(
            ckpt.metadata().get("total_size").map(String::as_str),
            Some(total.to_string().as_str())
        );
        assert!(ckpt.file_of("c").unwrap().ends_with(SHARD2));
        let a: Tensor<2> = ckpt.load_float("a", &dev, DType::F32).unwrap();
        assert_eq!(
            a.into_data().try_to_vec::<f32>().unwrap(),
            f32_values(4, 0.0)
        );
        let c: Tensor<1> = ckpt.load_float("c", &dev, DType::F16).unwrap();
        let expect: Vec<f16> = f32_values(6, 1.0).into_iter().map(f16::from_f32).collect();
        assert_eq!(c.into_data().try_to_vec::<f16>().unwrap(), expect);
        let b: Tensor<1, Int> = ckpt.load_int("b", &dev).unwrap();
        assert_eq!(
            b.into_data().convert::<i64>().try_to_vec::<i64>().unwrap(),
            vec![1, 2, 3]
        );
    }
}

#[test]
fn directory_with_single_file() {
    let dir = tempfile::tempdir().unwrap();
    save(
        dir.path().join("only.safetensors"),
        &[("x".to_owned(), TensorData::new(vec![2f32], [1]))],
        None,
    )
    .unwrap();
    assert_eq!(Checkpoint::open(dir.path()).unwrap().names(), vec!["x"]);
    let empty = tempfile::tempdir().unwrap();
    let err = Checkpoint::open(empty.path()).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::NotACheckpoint { .. }),
        "{err}"
    );
}

#[test]
fn sharded_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let total = write_shards(dir.path());
    let missing = "model-00003-of-00003.safetensors";
    write_index(dir.path(), total, &[("a", SHARD1), ("z", missing)]);
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::MissingShard { shard, .. } if shard == missing),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(missing), "{msg}");
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
}

#[test]
fn sharded_tensor_absent_from_its_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let total = write_shards(dir.path());
    write_index(
        dir.path(),
        total,
        &[
            ("a", SHARD1),
            ("b", SHARD1),
            ("c", SHARD2),
            ("ghost", SHARD2),
        ],
    );
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::TensorNotInShard { tensor, shard, .. } if tensor == "ghost" && shard == SHARD2),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("\"ghost\"") && msg.contains(SHARD2), "{msg}");

    // Mapped to the wrong shard is the same error.
    write_index(dir.path(), total, &[("a", SHARD2), ("c", SHARD2)]);
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::TensorNotInShard { tensor, .. } if tensor == "a"),
        "{err:?}"
    );
}

#[test]
fn sharded_duplicate_and_invalid_index() {
    let dir = tempfile::tempdir().unwrap();
    let total = write_shards(dir.path());
    save(
        dir.path().join(SHARD2),
        &[("a".to_owned(), TensorData::new(f32_values(4, 0.0), [2, 2]))],
        None,
    )
    .unwrap();
    write_index(dir.path(), total, &[("a", SHARD1), ("b", SHARD2)]);
    let err = Checkpoint::open(dir.path()).unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::DuplicateTensor { tensor, .. } if tensor == "a"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(SHARD1) && msg.contains(SHARD2), "{msg}");

    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"metadata": {}}"#).unwrap();
    let err = Checkpoint::open(&index).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::InvalidIndex { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("weight_map"), "{err}");

    std::fs::write(&index, r#"{"weight_map": {"a": "../escape.safetensors"}}"#).unwrap();
    let err = Checkpoint::open(&index).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::InvalidIndex { .. }),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Malformed files
// ---------------------------------------------------------------------------------------------

/// Opens `bytes` both from disk (as `name`) and from memory, expecting the same failure; checks
/// that the message names the file and returns the error from disk.
fn open_err(name: &str, bytes: &[u8]) -> SafetensorsError {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), name, bytes);
    let err = Checkpoint::open(&path).expect_err("malformed file must not open");
    let msg = err.to_string();
    assert!(msg.contains(name), "message does not name the file: {msg}");
    let mem = Checkpoint::from_bytes(name, bytes.to_vec()).expect_err("must fail from memory too");
    assert_eq!(
        std::mem::discriminant(&mem),
        std::mem::discriminant(&err),
        "disk: {err:?}, memory: {mem:?}"
    );
    assert!(mem.to_string().contains(name), "{mem}");
    err
}

fn assert_names(err: &SafetensorsError, tensor: &str) {
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("\"{tensor}\"")),
        "message does not name tensor {tensor:?}: {msg}"
    );
}

#[test]
fn malformed_empty_file() {
    let err = open_err("empty.safetensors", &[]);
    assert!(
        matches!(err, SafetensorsError::TooSmall { len: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn malformed_five_byte_file() {
    let err = open_err("five.safetensors", &[1, 2, 3, 4, 5]);
    assert!(
        matches!(err, SafetensorsError::TooSmall { len: 5, .. }),
        "{err:?}"
    );
}

#[test]
fn malformed_header_length_past_end() {
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}        ");
    let err = open_err("huge_header.safetensors", &bytes);
    assert!(
        matches!(
            err,
            SafetensorsError::HeaderTooLarge {
                header_len: 1000,
                file_len: 18,
                ..
            }
        ),
        "{err:?}"
    );
    // A garbage prefix (e.g. a text file) gives the same error.
    let err = open_err("text.safetensors", b"hello world, not a tensor file");
    assert!(
        matches!(err, SafetensorsError::HeaderTooLarge { .. }),
        "{err:?}"
    );
}

#[test]
fn malformed_header_not_json() {
    let err = open_err("notjson.safetensors", &raw_file("{not json at all", &[]));
    assert!(
        matches!(err, SafetensorsError::InvalidHeader { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not valid JSON"), "{err}");

    let mut bytes = 4u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[b'{', 0xff, 0xfe, b'}']);
    let err = open_err("notutf8.safetensors", &bytes);
    assert!(
        matches!(err, SafetensorsError::InvalidHeader { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("UTF-8"), "{err}");
}

#[test]
fn malformed_header_not_an_object() {
    let err = open_err("array.safetensors", &raw_file("[1, 2, 3]", &[]));
    assert!(
        matches!(err, SafetensorsError::InvalidHeader { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("wrong structure"), "{err}");
    let err = open_err("entry.safetensors", &raw_file(r#"{"w": 5}"#, &[]));
    assert!(
        matches!(err, SafetensorsError::InvalidTensorEntry { .. }),
        "{err:?}"
    );
    assert_names(&err, "w");
    let err = open_err(
        "badmeta.safetensors",
        &raw_file(r#"{"__metadata__": {"n": 1}}"#, &[]),
    );
    assert!(
        matches!(err, SafetensorsError::InvalidHeader { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("__metadata__"), "{err}");
    let err = open_err(
        "dupkey.safetensors",
        &raw_file(
            r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
            &[0],
        ),
    );
    assert!(
        matches!(err, SafetensorsError::InvalidHeader { .. }),
        "{err:?}"
    );
    assert_names(&err, "w");
}

#[test]
fn malformed_missing_data_offsets() {
    let err = open_err(
        "nooffsets.safetensors",
        &raw_file(r#"{"w.weight": {"dtype": "F32", "shape": [1]}}"#, &[0; 4]),
    );
    assert!(
        matches!(&err, SafetensorsError::InvalidTensorEntry { tensor, .. } if tensor == "w.weight"),
        "{err:?}"
    );
    assert_names(&err, "w.weight");
    assert!(err.to_string().contains("data_offsets"), "{err}");
}

#[test]
fn malformed_unknown_dtype() {
    let err = open_err(
        "f9.safetensors",
        &raw_file(
            r#"{"emb": {"dtype": "F9", "shape": [1], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        ),
    );
    assert!(
        matches!(&err, SafetensorsError::UnknownDtype { dtype, tensor, .. } if dtype == "F9" && tensor == "emb"),
        "{err:?}"
    );
    assert_names(&err, "emb");
    assert!(err.to_string().contains("F9"), "{err}");
}

#[test]
fn malformed_offsets_out_of_range() {
    let err = open_err(
        "range.safetensors",
        &raw_file(
            r#"{"lm_head.weight": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}"#,
            &[0; 16],
        ),
    );
    assert!(
        matches!(
            &err,
            SafetensorsError::OffsetsOutOfRange { tensor, begin: 16, end: 24, data_len: 16, .. }
                if tensor == "lm_head.weight"
        ),
        "{err:?}"
    );
    assert_names(&err, "lm_head.weight");
    assert!(
        err.to_string()
            .contains("data_offsets [16, 24] run past the end of the data section (16 bytes)"),
        "{err}"
    );
}

#[test]
fn malformed_end_before_begin() {
    let err = open_err(
        "reversed.safetensors",
        &raw_file(
            r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}"#,
            &[0; 8],
        ),
    );
    assert!(
        matches!(
            &err,
            SafetensorsError::ReversedOffsets {
                begin: 8,
                end: 0,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "w");
}

#[test]
fn malformed_size_mismatch() {
    let err = open_err(
        "size.safetensors",
        &raw_file(
            r#"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#,
            &[0; 8],
        ),
    );
    assert!(
        matches!(
            &err,
            SafetensorsError::SizeMismatch {
                expected: 12,
                actual: 8,
                ..
            }
        ),
        "{err:?}"
    );
    assert_names(&err, "w");
}

#[test]
fn malformed_overlap() {
    let err = open_err(
        "overlap.safetensors",
        &raw_file(
            r#"{"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
            &[0; 12],
        ),
    );
    assert!(
        matches!(&err, SafetensorsError::Overlap { first, second, .. } if first == "a" && second == "b"),
        "{err:?}"
    );
    assert_names(&err, "a");
    assert_names(&err, "b");
}

#[test]
fn malformed_gap() {
    let err = open_err(
        "gap.safetensors",
        &raw_file(
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}"#,
            &[0; 20],
        ),
    );
    assert!(
        matches!(
            err,
            SafetensorsError::Gap {
                begin: 8,
                end: 12,
                ..
            }
        ),
        "{err:?}"
    );
    // Trailing bytes that no tensor indexes.
    let err = open_err(
        "trailing.safetensors",
        &raw_file(
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#,
            &[0; 12],
        ),
    );
    assert!(
        matches!(
            err,
            SafetensorsError::Gap {
                begin: 8,
                end: 12,
                ..
            }
        ),
        "{err:?}"
    );
    // A gap at the start.
    let err = open_err(
        "leading.safetensors",
        &raw_file(
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
            &[0; 12],
        ),
    );
    assert!(
        matches!(
            err,
            SafetensorsError::Gap {
                begin: 0,
                end: 4,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn malformed_truncated_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.safetensors");
    save(
        &path,
        &[
            ("a".to_owned(), TensorData::new(f32_values(4, 0.0), [4])),
            ("b".to_owned(), TensorData::new(f32_values(4, 1.0), [4])),
        ],
        None,
    )
    .unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 6);
    let err = open_err("truncated.safetensors", &bytes);
    assert!(
        matches!(&err, SafetensorsError::Truncated { tensor, expected: 32, actual: 26, .. } if tensor == "b"),
        "{err:?}"
    );
    assert_names(&err, "b");
}

#[test]
fn malformed_invalid_bool_byte() {
    let ckpt = Checkpoint::from_bytes(
        "bool.safetensors",
        raw_file(
            r#"{"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}"#,
            &[1, 2],
        ),
    )
    .unwrap();
    let err = ckpt.tensor_data("m").unwrap_err();
    assert!(
        matches!(err, SafetensorsError::InvalidData { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("bool.safetensors"), "{err}");
    assert_names(&err, "m");
}

fn valid_checkpoint(dir: &Path) -> (PathBuf, Checkpoint) {
    let path = dir.join("valid.safetensors");
    save(
        &path,
        &[
            ("w".to_owned(), TensorData::new(f32_values(6, 0.0), [2, 3])),
            ("ids".to_owned(), TensorData::new(vec![1i64, 2], [2])),
        ],
        None,
    )
    .unwrap();
    let ckpt = Checkpoint::open(&path).unwrap();
    (path, ckpt)
}

#[test]
fn rank_mismatch_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ckpt) = valid_checkpoint(dir.path());
    let err = ckpt
        .load_float::<3>("w", &device(), DType::F32)
        .unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::RankMismatch { tensor, expected: 3, actual: 2, .. } if tensor == "w"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("valid.safetensors"), "{msg}");
    assert_names(&err, "w");
    let err = ckpt.load_int::<2>("ids", &device()).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::RankMismatch { .. }),
        "{err:?}"
    );
}

#[test]
fn missing_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ckpt) = valid_checkpoint(dir.path());
    let err = ckpt
        .load_float::<2>("decoder.missing", &device(), DType::F32)
        .unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::MissingTensor { name, .. } if name == "decoder.missing"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("valid.safetensors"), "{msg}");
    assert_names(&err, "decoder.missing");
    assert!(matches!(
        ckpt.tensor_data("nope"),
        Err(SafetensorsError::MissingTensor { .. })
    ));
}

#[test]
fn unsupported_conversions() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ckpt) = valid_checkpoint(dir.path());
    let dev = device();
    // Integer stored, float asked.
    let err = ckpt.load_float::<1>("ids", &dev, DType::F32).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::UnsupportedConversion { .. }),
        "{err:?}"
    );
    assert_names(&err, "ids");
    // Float target that is not a float dtype.
    let err = ckpt.load_float::<2>("w", &dev, DType::I32).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::UnsupportedConversion { .. }),
        "{err:?}"
    );
    // Float stored, int asked.
    let err = ckpt.load_int::<2>("w", &dev).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::UnsupportedConversion { .. }),
        "{err:?}"
    );
    // A format dtype burn has no equivalent for: valid to open, refused on load.
    let ckpt = Checkpoint::from_bytes(
        "fp8.safetensors",
        raw_file(
            r#"{"q": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}"#,
            &[0; 4],
        ),
    )
    .unwrap();
    assert_eq!(ckpt.info("q").unwrap().dtype, StoredDType::F8_E4M3);
    let err = ckpt.tensor_data("q").unwrap_err();
    assert!(
        matches!(err, SafetensorsError::UnsupportedConversion { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("fp8.safetensors"), "{err}");
}

#[test]
fn save_rejects_bad_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("names.safetensors");
    let t = || TensorData::new(vec![1f32], [1]);
    for tensors in [
        vec![("a".to_owned(), t()), ("a".to_owned(), t())],
        vec![("__metadata__".to_owned(), t())],
        vec![(String::new(), t())],
    ] {
        let err = save(&path, &tensors, None).unwrap_err();
        assert!(
            matches!(err, SafetensorsError::InvalidTensorName { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("names.safetensors"), "{err}");
    }
    assert!(!path.exists());
    let err = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(err, SafetensorsError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("names.safetensors"), "{err}");
}
