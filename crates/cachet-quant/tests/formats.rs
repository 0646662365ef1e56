//! Bit-exactness against bitsandbytes 0.50.2 (goldens from `xtask/goldens/bnb.py`).

use std::path::Path;

use cachet_quant::blockwise::{AbsMax, dequantize_blockwise_with};
use cachet_quant::codes::{DYNAMIC_MAP, FP4, FP4_ORDER, NF4};
use cachet_quant::{Int8Weight, QuantType, int8_matmul, quantize_4bit, quantize_blockwise};
use cachet_tensor::safetensors::Checkpoint;
use serde_json::Value;

fn formats() -> Checkpoint {
    Checkpoint::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/formats.safetensors"),
    )
    .expect("golden formats.safetensors")
}

fn f32s(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.tensor_data(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn u8s(ck: &Checkpoint, name: &str) -> Vec<u8> {
    ck.tensor_data(name).unwrap().as_bytes().to_vec()
}

fn i64s(ck: &Checkpoint, name: &str) -> Vec<i64> {
    ck.tensor_data(name).unwrap().try_into_vec::<i64>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Asserts equality, reporting the first differing index instead of two long vectors.
#[track_caller]
fn same<T: PartialEq + std::fmt::Debug>(ours: &[T], bnb: &[T], what: &str) {
    assert_eq!(ours.len(), bnb.len(), "{what}: lengths differ");
    if let Some(i) = ours.iter().zip(bnb).position(|(a, b)| a != b) {
        let n = ours.iter().zip(bnb).filter(|(a, b)| a != b).count();
        panic!(
            "{what}: {n} differences, first at {i}: ours {:?}, bnb {:?}",
            ours[i], bnb[i]
        );
    }
}

fn cases(ck: &Checkpoint, kind: &str) -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = ck
        .metadata()
        .iter()
        .filter_map(|(k, v)| {
            let v: Value = serde_json::from_str(v).ok()?;
            (v.get("kind")?.as_str()? == kind).then(|| (k.clone(), v))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!out.is_empty(), "no {kind} cases in the goldens");
    out
}

#[test]
fn code_tables_match_bnb() {
    let ck = formats();
    assert_eq!(bits(&f32s(&ck, "tables.nf4")), bits(&NF4));
    assert_eq!(bits(&f32s(&ck, "tables.fp4")), bits(&FP4));
    assert_eq!(bits(&f32s(&ck, "tables.dynamic")), bits(&DYNAMIC_MAP));
    let order: Vec<u8> = i64s(&ck, "tables.fp4_order")
        .iter()
        .map(|&v| v as u8)
        .collect();
    assert_eq!(order, FP4_ORDER);
}

#[test]
fn four_bit_is_bit_exact() {
    let ck = formats();
    let all = cases(&ck, "4bit");
    assert!(all.len() >= 20);
    for (case, meta) in all {
        let shape: Vec<usize> = meta["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let blocksize = meta["blocksize"].as_u64().unwrap() as usize;
        let dq = meta["double_quant"].as_bool().unwrap();
        let qt = QuantType::parse(meta["quant_type"].as_str().unwrap()).unwrap();
        let input = f32s(&ck, &format!("{case}.input"));
        let q = quantize_4bit(&case, &input, &shape, blocksize, qt, dq).unwrap();
        q.validate(&case).unwrap();
        same(
            &q.packed,
            &u8s(&ck, &format!("{case}.packed")),
            &format!("{case} {meta} packed"),
        );
        match &q.absmax {
            AbsMax::Plain(a) => {
                assert!(!dq);
                same(
                    &bits(a),
                    &bits(&f32s(&ck, &format!("{case}.absmax"))),
                    &format!("{case} absmax"),
                );
            }
            AbsMax::Nested(n) => {
                assert!(dq);
                let offset = f32s(&ck, &format!("{case}.offset"))[0];
                assert_eq!(
                    n.offset.to_bits(),
                    offset.to_bits(),
                    "{}",
                    &format!("{case} offset")
                );
                same(
                    &n.quantized,
                    &u8s(&ck, &format!("{case}.qabsmax")),
                    &format!("{case} qabsmax"),
                );
                same(
                    &bits(&n.absmax),
                    &bits(&f32s(&ck, &format!("{case}.nested_absmax"))),
                    &format!("{case} nested absmax"),
                );
                same(
                    &bits(&n.code),
                    &bits(&f32s(&ck, &format!("{case}.nested_code"))),
                    &format!("{case} nested code"),
                );
            }
        }
        // Values equal; bits equal except the sign of zero for FP4 code 8, which bnb's CPU
        // kernels decode as -0.0 or +0.0 depending on the SIMD path the shape selects.
        let deq = q.dequantize();
        let want = f32s(&ck, &format!("{case}.dequant"));
        same(&deq, &want, &format!("{case} {meta} dequant"));
        let sign_only = deq
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .all(|(a, b)| *a == 0.0 && *b == 0.0);
        assert!(
            sign_only,
            "{case}: dequantized bits differ beyond the sign of zero"
        );
        if qt == QuantType::Nf4 {
            same(&bits(&deq), &bits(&want), &format!("{case} dequant bits"));
        }
    }
}

#[test]
fn eight_bit_blockwise_is_bit_exact() {
    let ck = formats();
    for (case, meta) in cases(&ck, "8bit") {
        let blocksize = meta["blocksize"].as_u64().unwrap() as usize;
        let input = f32s(&ck, &format!("{case}.input"));
        let q = quantize_blockwise(&case, &input, blocksize).unwrap();
        same(
            &q.quantized,
            &u8s(&ck, &format!("{case}.q")),
            &format!("{case} {meta} codes"),
        );
        same(
            &bits(&q.absmax),
            &bits(&f32s(&ck, &format!("{case}.absmax"))),
            &format!("{case} absmax"),
        );
        let code = f32s(&ck, &format!("{case}.code"));
        let deq = dequantize_blockwise_with(&q.quantized, &q.absmax, &code, blocksize);
        same(
            &bits(&deq),
            &bits(&f32s(&ck, &format!("{case}.dequant"))),
            &format!("{case} dequant"),
        );
        same(
            &bits(&q.dequantize()),
            &bits(&deq),
            &format!("{case}: stored code is the dynamic map"),
        );
    }
}

#[test]
fn int8_weights_are_bit_exact() {
    let ck = formats();
    for (case, meta) in cases(&ck, "int8_weight") {
        let shape = meta["shape"].as_array().unwrap();
        let (rows, cols) = (
            shape[0].as_u64().unwrap() as usize,
            shape[1].as_u64().unwrap() as usize,
        );
        let w =
            Int8Weight::quantize(&case, &f32s(&ck, &format!("{case}.input")), rows, cols).unwrap();
        let cb: Vec<i8> = u8s(&ck, &format!("{case}.CB"))
            .iter()
            .map(|&b| b as i8)
            .collect();
        same(&w.cb, &cb, &format!("{case} CB"));
        same(
            &bits(&w.scb),
            &bits(&f32s(&ck, &format!("{case}.SCB"))),
            &format!("{case} SCB"),
        );
    }
}

#[test]
fn int8_matmul_matches_linear8bitlt() {
    let ck = formats();
    for (case, meta) in cases(&ck, "int8_matmul") {
        let rows = meta["rows"].as_u64().unwrap() as usize;
        let (out_f, in_f) = (
            meta["out"].as_u64().unwrap() as usize,
            meta["in"].as_u64().unwrap() as usize,
        );
        let w = Int8Weight::quantize(&case, &f32s(&ck, &format!("{case}.weight")), out_f, in_f)
            .unwrap();
        let x = f32s(&ck, &format!("{case}.x"));
        let bias = f32s(&ck, &format!("{case}.bias"));
        // Threshold 0: integer matmul and the same f32 dequantization — bit-exact.
        let out0 = int8_matmul(&x, rows, &w, Some(&bias), 0.0);
        same(
            &bits(&out0),
            &bits(&f32s(&ck, &format!("{case}.out_t0"))),
            &format!("{case} threshold 0"),
        );
        // Threshold 6: the outlier columns go through f32 (summation order may differ).
        let out6 = int8_matmul(&x, rows, &w, Some(&bias), 6.0);
        let want = f32s(&ck, &format!("{case}.out_t6"));
        let max = out6
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max < 1e-5, "{case} threshold 6: max diff {max}");
        // And the decomposition matters: without it the result is different.
        let d0 = out0
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d0 > 1e-3, "{case}: outliers made no difference ({d0})");
        let act = cachet_quant::int8::quantize_activations(&x, rows, in_f, 6.0);
        let cols: Vec<usize> = i64s(&ck, &format!("{case}.outlier_cols"))
            .iter()
            .map(|&c| c as usize)
            .collect();
        same(&act.outlier_cols, &cols, &format!("{case} outlier columns"));
    }
}
