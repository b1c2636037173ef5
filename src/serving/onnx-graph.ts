/**
 * The served U-Net (src/model/unet.ts) written out as ONNX models, so that ONNX Runtime can run our own checkpoint
 * (not a PyTorch export): the same operations on the same weights, in ONNX's NCHW layout. No HTTP, queue or
 * database code; src/serving/onnx-engine.ts runs the result.
 *
 * What unet.ts computes, op by op (eval mode: running BatchNorm statistics, no dropout):
 * - conv 3x3 'same', no bias        -> Conv, pads 1, OIHW weights (tfjs holds them HWIO: [kh, kw, in, out])
 * - BatchNorm, eps 1e-5              -> BatchNormalization with the running mean / variance (ORT folds it into the
 *                                       conv; written out as BN so the graph reads like the model)
 * - ReLU                             -> Relu
 * - 2x2 max pool, 'valid'            -> MaxPool 2x2 stride 2, no padding (odd sizes floor, as tfjs's 'valid')
 * - tf.image.resizeBilinear(y, skip size, alignCorners false, halfPixelCenters false)
 *                                    -> Resize linear, coordinate_transformation_mode 'asymmetric' (source = out x in
 *                                       / out, edges clamped): not ONNX's default 'half_pixel', which is what
 *                                       tfjs's halfPixelCenters=true would be. Sizes are the skip's (opset 18's
 *                                       `axes` lets them name H and W only, so the batch stays free)
 * - concat([up, skip], channels)     -> Concat axis 1, upsampled first
 * - 1x1 conv with bias to one logit  -> Conv, then Sigmoid for p(tumour) per pixel
 * - head: mean over H, W -> dense -> ReLU -> dense(2)
 *                                    -> GlobalAveragePool, Flatten, Gemm (weights [in, out], as tfjs's matMul), Relu,
 *                                       Gemm, Softmax
 *
 * Three graphs share these weights: `encoder` (image -> p(tumour), the head's hidden pre-activations, the skips and
 * the bottleneck), `decoder` (skips + bottleneck -> p(tumour) per pixel) and `full` (image -> everything but the
 * skips). The demo runs the encoder first and the decoder only when the answer needs it (runImageModel's rule); a
 * volume, which always needs both, runs `full` and saves copying the skips out of ORT and back.
 *
 * The protobuf is encoded with protobufjs, from the subset of onnx.proto declared below (field numbers as in
 * onnx/onnx.proto, IR version 8): a well-kept encoder, and the few messages we write need no generated code.
 */
import { endianness } from 'node:os';
import protobuf from 'protobufjs';
import { BN_EPS, type UNetConfig, type UNetModel } from '../model/unet.ts';
import { SliceWiseError } from '../lib/errors.ts';

/** Opset 18: the first with Resize's `axes` attribute. */
const OPSET = 18;
/** IR version 8 goes with opsets 17-18 (onnx/docs/Versioning.md). */
const IR_VERSION = 8;

// onnx.proto's enums, the values we use.
const FLOAT = 1; // TensorProto.DataType.FLOAT
const INT64 = 7; // TensorProto.DataType.INT64
const ATTR = { FLOAT: 1, INT: 2, STRING: 3, INTS: 7 } as const; // AttributeProto.AttributeType

/** The messages of onnx.proto that a ModelProto of plain float tensors needs, with onnx.proto's field numbers. */
const ONNX_PROTO = protobuf.Root.fromJSON({
  nested: {
    onnx: {
      nested: {
        ModelProto: {
          fields: {
            ir_version: { id: 1, type: 'int64' },
            opset_import: { id: 8, type: 'OperatorSetIdProto', rule: 'repeated' },
            producer_name: { id: 2, type: 'string' },
            producer_version: { id: 3, type: 'string' },
            doc_string: { id: 6, type: 'string' },
            graph: { id: 7, type: 'GraphProto' },
          },
        },
        OperatorSetIdProto: { fields: { domain: { id: 1, type: 'string' }, version: { id: 2, type: 'int64' } } },
        GraphProto: {
          fields: {
            node: { id: 1, type: 'NodeProto', rule: 'repeated' },
            name: { id: 2, type: 'string' },
            initializer: { id: 5, type: 'TensorProto', rule: 'repeated' },
            input: { id: 11, type: 'ValueInfoProto', rule: 'repeated' },
            output: { id: 12, type: 'ValueInfoProto', rule: 'repeated' },
          },
        },
        NodeProto: {
          fields: {
            input: { id: 1, type: 'string', rule: 'repeated' },
            output: { id: 2, type: 'string', rule: 'repeated' },
            name: { id: 3, type: 'string' },
            op_type: { id: 4, type: 'string' },
            attribute: { id: 5, type: 'AttributeProto', rule: 'repeated' },
          },
        },
        AttributeProto: {
          fields: {
            name: { id: 1, type: 'string' },
            f: { id: 2, type: 'float' },
            i: { id: 3, type: 'int64' },
            s: { id: 4, type: 'bytes' },
            ints: { id: 8, type: 'int64', rule: 'repeated' },
            type: { id: 20, type: 'int32' },
          },
        },
        TensorProto: {
          fields: {
            dims: { id: 1, type: 'int64', rule: 'repeated' },
            data_type: { id: 2, type: 'int32' },
            name: { id: 8, type: 'string' },
            raw_data: { id: 9, type: 'bytes' },
          },
        },
        ValueInfoProto: { fields: { name: { id: 1, type: 'string' }, type: { id: 2, type: 'TypeProto' } } },
        TypeProto: { fields: { tensor_type: { id: 1, type: 'TypeProtoTensor' } } },
        // TypeProto.Tensor in onnx.proto; a nested message's name does not reach the wire.
        TypeProtoTensor: { fields: { elem_type: { id: 1, type: 'int32' }, shape: { id: 2, type: 'TensorShapeProto' } } },
        TensorShapeProto: { fields: { dim: { id: 1, type: 'Dimension', rule: 'repeated' } } },
        // TensorShapeProto.Dimension: dim_value / dim_param (a oneof on the wire: we set one of them).
        Dimension: { fields: { dim_value: { id: 1, type: 'int64' }, dim_param: { id: 2, type: 'string' } } },
      },
    },
  },
});
const ModelProto = ONNX_PROTO.lookupType('onnx.ModelProto');

export type OnnxPart = 'encoder' | 'decoder' | 'full';

export interface OnnxGraphOptions {
  /** Height and width of the input images (the run's image size); the batch dimension stays free. */
  imageSize: number;
}

/** Input and output names of the graphs (see the module comment). */
export const ONNX_NAMES = {
  /** N x C x S x S, channels first: the layout SliceBatch holds. */
  input: 'image',
  /** N x 2, softmax of the classification logits (index 1 = tumour). */
  clsProb: 'cls_prob',
  /** N x headHidden, the head's first dense layer before its ReLU (which units are on, for Grad-CAM's gradient). */
  headHidden: 'head_hidden',
  /** N x C x h x w, the last encoder block, which the head reads and Grad-CAM explains. */
  bottleneck: 'bottleneck',
  /** N x 1 x S x S, sigmoid of the segmentation logits. */
  segProb: 'seg_prob',
  /** Encoder output of level i (0 = full resolution), i < depth: the decoder's skip connections. */
  skip: (i: number) => `skip_${i}`,
} as const;

/** Spatial size per level: level 0 is the image, each max pool floors the size by half. */
export function levelSizes(config: UNetConfig, imageSize: number): number[] {
  const sizes = [imageSize];
  for (let i = 1; i <= config.depth; i++) sizes.push(Math.floor(sizes[i - 1]! / 2));
  if (sizes[config.depth]! < 1) {
    throw new SliceWiseError(`a depth-${config.depth} U-Net cannot take ${imageSize} x ${imageSize} images: the bottleneck would be empty`, { status: 422, code: 'bad_image_size' });
  }
  return sizes;
}

/** HWIO (tfjs: [kh, kw, in, out]) to OIHW (ONNX: [out, in, kh, kw]). */
export function hwioToOihw(src: Float32Array, [kh, kw, cin, cout]: readonly number[]): Float32Array {
  const dst = new Float32Array(src.length);
  for (let y = 0; y < kh!; y++) {
    for (let x = 0; x < kw!; x++) {
      for (let i = 0; i < cin!; i++) {
        const from = ((y * kw! + x) * cin! + i) * cout!;
        for (let o = 0; o < cout!; o++) dst[((o * cin! + i) * kh! + y) * kw! + x] = src[from + o]!;
      }
    }
  }
  return dst;
}

interface Attribute {
  name: string;
  type: number;
  f?: number;
  i?: number;
  s?: Uint8Array;
  ints?: number[];
}

const ints = (name: string, v: number[]): Attribute => ({ name, type: ATTR.INTS, ints: v });
const int = (name: string, v: number): Attribute => ({ name, type: ATTR.INT, i: v });
const float = (name: string, v: number): Attribute => ({ name, type: ATTR.FLOAT, f: v });
const str = (name: string, v: string): Attribute => ({ name, type: ATTR.STRING, s: new TextEncoder().encode(v) });

function valueInfo(name: string, dims: (number | string)[]) {
  return {
    name,
    type: { tensor_type: { elem_type: FLOAT, shape: { dim: dims.map((d) => (typeof d === 'number' ? { dim_value: d } : { dim_param: d })) } } },
  };
}

/** Little-endian bytes of a typed array, as TensorProto.raw_data wants them. */
function rawBytes(a: Float32Array | BigInt64Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

class GraphBuilder {
  readonly nodes: { input: string[]; output: string[]; name: string; op_type: string; attribute: Attribute[] }[] = [];
  readonly initializers: { name: string; dims: number[]; data_type: number; raw_data: Uint8Array }[] = [];
  private count = 0;

  constant(name: string, dims: number[], data: Float32Array | BigInt64Array): string {
    const n = dims.reduce((a, b) => a * b, 1);
    if (data.length !== n) throw new RangeError(`onnx graph: ${name} has ${data.length} values for dims [${dims.join(', ')}]`);
    this.initializers.push({ name, dims, data_type: data instanceof Float32Array ? FLOAT : INT64, raw_data: rawBytes(data) });
    return name;
  }

  /** One node; returns its output's name (`out` when given, else a fresh one). */
  op(op: string, inputs: string[], attrs: Attribute[] = [], out?: string): string {
    const name = `${op.toLowerCase()}_${this.count++}`;
    const output = out ?? name;
    this.nodes.push({ input: inputs, output: [output], name, op_type: op, attribute: attrs });
    return output;
  }
}

/**
 * The ONNX graph of one part of the model, as ModelProto bytes for InferenceSession.create. `weights` are the
 * model's parameters and BatchNorm buffers by name, in unet.ts's layouts.
 */
export function buildOnnxGraph(config: UNetConfig, weights: ReadonlyMap<string, Float32Array>, part: OnnxPart, { imageSize }: OnnxGraphOptions): Uint8Array {
  if (endianness() !== 'LE') throw new Error('onnx graph: raw_data is little-endian and this machine is not'); // never on x64 / arm64 Linux
  const { base, depth, inChannels, headHidden } = config;
  const sizes = levelSizes(config, imageSize);
  const ch = (level: number) => base * 2 ** level;
  const g = new GraphBuilder();
  const w = (name: string): Float32Array => {
    const v = weights.get(name);
    if (!v) throw new SliceWiseError(`onnx graph: the model has no ${name}`, { status: 422, code: 'checkpoint_mismatch' });
    return v;
  };

  const conv3 = (x: string, prefix: string, cin: number, cout: number): string => {
    const filter = g.constant(`${prefix}.weight`, [cout, cin, 3, 3], hwioToOihw(w(`${prefix}.weight`), [3, 3, cin, cout]));
    return g.op('Conv', [x, filter], [ints('kernel_shape', [3, 3]), ints('pads', [1, 1, 1, 1]), ints('strides', [1, 1])]);
  };
  const bn = (x: string, prefix: string, c: number, out?: string): string => {
    const names = ['weight', 'bias', 'running_mean', 'running_var'].map((k) => g.constant(`${prefix}.${k}`, [c], w(`${prefix}.${k}`)));
    return g.op('Relu', [g.op('BatchNormalization', [x, ...names], [float('epsilon', BN_EPS)])], [], out);
  };
  const doubleConv = (x: string, prefix: string, cin: number, cout: number, out?: string): string =>
    bn(conv3(bn(conv3(x, `${prefix}.conv1`, cin, cout), `${prefix}.bn1`, cout), `${prefix}.conv2`, cout, cout), `${prefix}.bn2`, cout, out);

  const inputs: ReturnType<typeof valueInfo>[] = [];
  const outputs: ReturnType<typeof valueInfo>[] = [];
  const skipName = (i: number) => (i === depth ? ONNX_NAMES.bottleneck : ONNX_NAMES.skip(i));
  const skipDims = (i: number) => ['N', ch(i), sizes[i]!, sizes[i]!];

  // Encoder and head.
  let skips: string[];
  if (part === 'decoder') {
    skips = Array.from({ length: depth + 1 }, (_, i) => skipName(i));
    skips.forEach((s, i) => inputs.push(valueInfo(s, skipDims(i))));
  } else {
    inputs.push(valueInfo(ONNX_NAMES.input, ['N', inChannels, imageSize, imageSize]));
    skips = [doubleConv(ONNX_NAMES.input, 'encoder.0', inChannels, base, depth === 0 ? ONNX_NAMES.bottleneck : part === 'encoder' ? ONNX_NAMES.skip(0) : undefined)];
    for (let i = 1; i <= depth; i++) {
      const pooled = g.op('MaxPool', [skips[i - 1]!], [ints('kernel_shape', [2, 2]), ints('strides', [2, 2])]);
      skips.push(doubleConv(pooled, `encoder.${i}`, ch(i - 1), ch(i), i === depth || part === 'encoder' ? skipName(i) : undefined));
    }
    const pooled = g.op('Flatten', [g.op('GlobalAveragePool', [ONNX_NAMES.bottleneck])], [int('axis', 1)]);
    const fc = (x: string, name: string, cin: number, cout: number, out?: string) =>
      g.op('Gemm', [x, g.constant(`${name}.weight`, [cin, cout], w(`${name}.weight`)), g.constant(`${name}.bias`, [cout], w(`${name}.bias`))], [], out);
    const hidden = fc(pooled, 'head.fc1', ch(depth), headHidden, ONNX_NAMES.headHidden);
    g.op('Softmax', [fc(g.op('Relu', [hidden]), 'head.fc2', headHidden, 2)], [int('axis', 1)], ONNX_NAMES.clsProb);
    outputs.push(valueInfo(ONNX_NAMES.clsProb, ['N', 2]), valueInfo(ONNX_NAMES.headHidden, ['N', headHidden]), valueInfo(ONNX_NAMES.bottleneck, skipDims(depth)));
    if (part === 'encoder') for (let i = 0; i < depth; i++) outputs.push(valueInfo(ONNX_NAMES.skip(i), skipDims(i)));
  }

  // Decoder.
  if (part !== 'encoder') {
    let y = skips[depth]!;
    for (let i = 0; i < depth; i++) {
      const level = depth - i - 1;
      const resize = [str('mode', 'linear'), str('coordinate_transformation_mode', 'asymmetric')];
      // Inputs X, roi (unused by 'asymmetric': empty name), scales, sizes. An exact doubling is given as scales
      // [1, 1, 2, 2]: ORT then runs the Resize in its blocked NCHWc layout with the convolutions around it (small at
      // 256, 2 threads: 34 -> 22 ms per pass; given as sizes, it reorders to NCHW and back around every Resize).
      // A skip of odd size is not twice the level below: that Resize names its sizes, for H and W only (`axes`).
      const up =
        sizes[level] === 2 * sizes[level + 1]!
          ? g.op('Resize', [y, '', g.constant(`resize_scales_${i}`, [4], Float32Array.from([1, 1, 2, 2]))], resize)
          : g.op('Resize', [y, '', '', g.constant(`resize_sizes_${i}`, [2], BigInt64Array.from([BigInt(sizes[level]!), BigInt(sizes[level]!)]))], [...resize, ints('axes', [2, 3])]);
      y = doubleConv(g.op('Concat', [up, skips[level]!], [int('axis', 1)]), `decoder.${i}`, ch(level + 1) + ch(level), ch(level));
    }
    const outW = g.constant('decoder.out.weight', [1, base, 1, 1], w('decoder.out.weight')); // [1,1,base,1] HWIO is [1,base,1,1] OIHW, same order
    const logits = g.op('Conv', [y, outW, g.constant('decoder.out.bias', [1], w('decoder.out.bias'))], [ints('kernel_shape', [1, 1])]);
    g.op('Sigmoid', [logits], [], ONNX_NAMES.segProb);
    outputs.push(valueInfo(ONNX_NAMES.segProb, ['N', 1, imageSize, imageSize]));
  }

  const model = {
    ir_version: IR_VERSION,
    opset_import: [{ domain: '', version: OPSET }],
    producer_name: 'slicewise',
    producer_version: '1',
    doc_string: `SliceWise multi-task U-Net (base ${base}, depth ${depth}, head ${headHidden}, ${inChannels} channel(s)), part ${part}, ${imageSize} x ${imageSize}`,
    graph: { name: `slicewise_unet_${part}`, node: g.nodes, initializer: g.initializers, input: inputs, output: outputs },
  };
  const err = ModelProto.verify(model);
  if (err) throw new Error(`onnx graph: ${err}`);
  return ModelProto.encode(ModelProto.fromObject(model)).finish();
}

/** The model's parameters and BatchNorm buffers as plain arrays, by name (reads the tfjs variables once). */
export function weightsOf(model: UNetModel): Map<string, Float32Array> {
  const out = new Map<string, Float32Array>();
  for (const [name, v] of [...model.params, ...model.buffers]) out.set(name, v.dataSync() as Float32Array);
  return out;
}
