/**
 * Hand-written WebAssembly SIMD loops that run directly on the tfjs wasm backend's heap (the module imports the
 * backend's WebAssembly.Memory, so tensors are used in place: no copies in or out). A second build of the same
 * module imports a shared memory, for the worker pool of ./simd-threads.ts.
 *
 * - conv: direct stride-1 convolution with implicit zero padding (forward Conv2D and, with the rotated filter,
 *   Conv2DBackpropInput); 4 pixels x 8 output channels per register tile.
 * - convFilterGrad: dW[kh, kw, c, o] += sum_{n, y, x} X[n, y + kh - pt, x + kw - pl, c] * DY[n, y, x, o], one row of
 *   dy at a time, every (kh, kw, 4 input channels, 8 output channels) tile of dW held in eight registers while the
 *   row streams by, so the working set stays in cache.
 * - colSum (Sum / Mean over leading axes), copyRows (Concat / SplitV / channel padding), bcast_* (binary ops with a
 *   per-channel or scalar operand), maxPoolGrad2x2, resizeBilinearGrad.
 *
 * On x86-64, V8 turns these into 128-bit SSE/AVX ops without FMA: ~20 GFLOP/s per core for the convolutions.
 */
import { assemble, F32, Fn, I32, V128 } from './wasm-asm.js';

function buildConvFilterGrad(): Fn {
  const f = new Fn('convFilterGrad', [
    ['x', I32],
    ['dy', I32],
    ['acc', I32],
    ['r0', I32],
    ['r1', I32],
    ['H', I32],
    ['W', I32],
    ['oH', I32],
    ['oW', I32],
    ['Cp', I32],
    ['Op', I32],
    ['KH', I32],
    ['KW', I32],
    ['pt', I32],
    ['pl', I32],
  ]);
  f.locals(I32, 'r', 'n', 'y', 'kh', 'kw', 'iy', 'x0', 'x1', 'cb', 'ob', 'xRow', 'dyRow', 'xp', 'dp', 'k', 'a0', 'a1', 'a2', 'a3', 'xs', 'ds', 'cnt');
  f.locals(V128, 'c00', 'c01', 'c10', 'c11', 'c20', 'c21', 'c30', 'c31', 'd0', 'd1', 's');
  const fromZero = (g: Fn): void => void g.i32(0);
  const local = (name: string) => (g: Fn): void => void g.get(name);

  f.get('Cp').i32(2).shl().set('xs');
  f.get('Op').i32(2).shl().set('ds');
  // Rows r = n * oH + y of dy in [r0, r1): threads split the rows and accumulate into separate buffers.
  f.for('r', local('r0'), local('r1'), 1, () => {
    f.get('r').get('oH').divU().set('n');
    f.get('r').get('n').get('oH').mul().sub().set('y');
    {
      // dyRow = dy + ((n * oH + y) * oW) * ds
      f.get('dy').get('n').get('oH').mul().get('y').add().get('oW').mul().get('ds').mul().add().set('dyRow');
      f.for('kh', fromZero, local('KH'), 1, (nextKh) => {
        // iy = y + kh - pt; skip rows outside [0, H) (unsigned compare also catches negatives)
        f.get('y').get('kh').add().get('pt').sub().tee('iy').get('H').geU().brIf(nextKh);
        f.get('x').get('n').get('H').mul().get('iy').add().get('W').mul().get('xs').mul().add().set('xRow');
        f.for('kw', fromZero, local('KW'), 1, (nextKw) => {
          // x0 = max(0, pl - kw); x1 = min(oW, W + pl - kw)
          f.get('pl').get('kw').sub().set('x0');
          f.get('x0').i32(0).get('x0').i32(0).gtS().select().set('x0');
          f.get('W').get('pl').add().get('kw').sub().set('x1');
          f.get('x1').get('oW').get('x1').get('oW').ltS().select().set('x1');
          f.get('x0').get('x1').geS().brIf(nextKw);
          f.get('x1').get('x0').sub().set('cnt');
          f.for('cb', fromZero, local('Cp'), 4, () => {
            f.for('ob', fromZero, local('Op'), 8, () => {
              // a0 = acc + (((kh * KW + kw) * Cp + cb) * Op + ob) * 4; rows of the tile are ds bytes apart
              f.get('acc').get('kh').get('KW').mul().get('kw').add().get('Cp').mul().get('cb').add().get('Op').mul()
                .get('ob').add().i32(2).shl().add().set('a0');
              f.get('a0').get('ds').add().set('a1');
              f.get('a1').get('ds').add().set('a2');
              f.get('a2').get('ds').add().set('a3');
              const rows = ['a0', 'a1', 'a2', 'a3'];
              rows.forEach((a, i) => {
                f.get(a).v128Load(0).set(`c${i}0`);
                f.get(a).v128Load(16).set(`c${i}1`);
              });
              // xp = xRow + (x0 + kw - pl) * xs + cb * 4; dp = dyRow + x0 * ds + ob * 4
              f.get('xRow').get('x0').get('kw').add().get('pl').sub().get('xs').mul().add().get('cb').i32(2).shl().add().set('xp');
              f.get('dyRow').get('x0').get('ds').mul().add().get('ob').i32(2).shl().add().set('dp');
              f.get('cnt').set('k');
              f.loop((top) => {
                f.get('dp').v128Load(0).set('d0');
                f.get('dp').v128Load(16).set('d1');
                for (let i = 0; i < 4; i++) {
                  f.get('xp').load32Splat(4 * i).set('s');
                  f.get(`c${i}0`).get('s').get('d0').f32x4Mul().f32x4Add().set(`c${i}0`);
                  f.get(`c${i}1`).get('s').get('d1').f32x4Mul().f32x4Add().set(`c${i}1`);
                }
                f.inc('xp', 'xs');
                f.inc('dp', 'ds');
                f.get('k').i32(1).sub().tee('k').brIf(top);
              });
              rows.forEach((a, i) => {
                f.get(a).get(`c${i}0`).v128Store(0);
                f.get(a).get(`c${i}1`).v128Store(16);
              });
            });
          });
        });
      });
    }
  });
  return f;
}

/** dst[b] = sum_{r < R} src[r * B + b] for b < B, B a multiple of 4 (f32 accumulation: callers block R). */
function buildColSum(): Fn {
  const f = new Fn('colSum', [
    ['src', I32],
    ['dst', I32],
    ['R', I32],
    ['B', I32],
  ]);
  f.locals(I32, 'cb', 'p', 'r', 'rs');
  f.locals(V128, 'a0', 'a1');
  f.get('B').i32(2).shl().set('rs');
  f.for('cb', (g) => void g.i32(0), (g) => void g.get('B'), 4, () => {
    f.v128Zero().set('a0');
    f.v128Zero().set('a1');
    f.get('src').get('cb').i32(2).shl().add().set('p');
    // Two accumulators (even / odd rows) to halve the add latency chain.
    f.i32(0).set('r');
    f.block((done) => {
      f.loop((top) => {
        f.get('r').i32(1).add().get('R').geS().brIf(done);
        f.get('a0').get('p').v128Load(0).f32x4Add().set('a0');
        f.get('p').get('rs').add().set('p');
        f.get('a1').get('p').v128Load(0).f32x4Add().set('a1');
        f.get('p').get('rs').add().set('p');
        f.inc('r', 2);
        f.br(top);
      });
    });
    f.get('r').get('R').ltS().if(() => {
      f.get('a0').get('p').v128Load(0).f32x4Add().set('a0');
    });
    f.get('dst').get('cb').i32(2).shl().add().get('a0').get('a1').f32x4Add().v128Store(0);
  });
  return f;
}

/**
 * Copies `rows` rows of `w` 32-bit elements from src (row stride ss elements) to dst (row stride ds elements):
 * 16-byte vectors, then a scalar tail. Bit-exact (i32 / v128 moves), so it serves float32 and int32 alike.
 */
function buildCopyRows(): Fn {
  const f = new Fn('copyRows', [
    ['src', I32],
    ['dst', I32],
    ['rows', I32],
    ['w', I32],
    ['ss', I32],
    ['ds', I32],
  ]);
  f.locals(I32, 'r', 'p', 'q', 'end', 'vend', 'ssb', 'dsb');
  f.get('ss').i32(2).shl().set('ssb');
  f.get('ds').i32(2).shl().set('dsb');
  f.for('r', (g) => void g.i32(0), (g) => void g.get('rows'), 1, () => {
    f.get('src').get('r').get('ssb').mul().add().set('p');
    f.get('dst').get('r').get('dsb').mul().add().set('q');
    f.get('p').get('w').i32(2).shl().add().set('end');
    f.get('p').get('w').i32(-4).and().i32(2).shl().add().set('vend');
    f.block((done) => {
      f.loop((top) => {
        f.get('p').get('vend').geU().brIf(done);
        f.get('q').get('p').v128Load(0).v128Store(0);
        f.inc('p', 16);
        f.inc('q', 16);
        f.br(top);
      });
    });
    f.block((done) => {
      f.loop((top) => {
        f.get('p').get('end').geU().brIf(done);
        f.get('q').get('p').i32Load(0).i32Store(0);
        f.inc('p', 4);
        f.inc('q', 4);
        f.br(top);
      });
    });
  });
  return f;
}

/**
 * Direct stride-1 convolution of an NHWC input with implicit zero padding (pt rows on top, pl columns on the left):
 * y[n, oy, ox, o] = sum_{kh, kw, c} x[n, oy + kh - pt, ox + kw - pl, c] * w[kh, kw, c, o] over in-range rows and
 * columns, for o < Op, Op a multiple of 8. For a fixed kh, the (kw, c) pairs of one output pixel are contiguous in
 * both x and w, so the inner loop runs over t = kw * Cin + c. Output columns [xa, xb) (a multiple of 4 wide) have
 * every kw in range and use a 4 pixels x 8 channels register tile; the other columns (the borders, a remainder)
 * use 1-pixel tiles over their in-range kw. Rows outside the input are skipped.
 */
function buildConv(): Fn {
  const f = new Fn('conv', [
    ['x', I32],
    ['w', I32],
    ['y', I32],
    ['r0', I32],
    ['r1', I32],
    ['H', I32],
    ['W', I32],
    ['Cin', I32],
    ['oH', I32],
    ['oW', I32],
    ['Op', I32],
    ['KH', I32],
    ['KW', I32],
    ['pt', I32],
    ['pl', I32],
    ['xa', I32],
    ['xb', I32],
  ]);
  f.locals(I32, 'r', 'n', 'oy', 'iy', 'ox', 'ob', 'kh', 'kw0', 'kw1', 'k', 'T', 'xs', 'xs2', 'xs3', 'ys', 'xImg', 'yRow', 'xp', 'wp', 'yp');
  const accs: string[] = [];
  for (let i = 0; i < 4; i++) accs.push(`a${i}0`, `a${i}1`);
  f.locals(V128, ...accs, 'w0', 'w1', 's');
  f.get('KW').get('Cin').mul().set('T');
  f.get('Cin').i32(2).shl().set('xs');
  f.get('xs').i32(1).shl().set('xs2');
  f.get('xs2').get('xs').add().set('xs3');
  f.get('Op').i32(2).shl().set('ys');
  const zero = (g: Fn): void => void g.i32(0);
  const tiles = (P: 4 | 1, from: (g: Fn) => void, to: (g: Fn) => void): void => {
    f.for('ox', from, to, P, () => {
      f.for('ob', zero, (g) => void g.get('Op'), 8, () => {
        for (let i = 0; i < P; i++) {
          f.v128Zero().set(`a${i}0`);
          f.v128Zero().set(`a${i}1`);
        }
        f.for('kh', zero, (g) => void g.get('KH'), 1, (nextKh) => {
          // iy = oy + kh - pt; rows outside [0, H) contribute nothing (unsigned compare catches negatives)
          f.get('oy').get('kh').add().get('pt').sub().tee('iy').get('H').geU().brIf(nextKh);
          if (P === 4) {
            f.i32(0).set('kw0');
            f.get('T').set('k');
          } else {
            // in-range kw: kw0 = max(0, pl - ox), kw1 = min(KW, W + pl - ox)
            f.get('pl').get('ox').sub().set('kw0');
            f.get('kw0').i32(0).get('kw0').i32(0).gtS().select().set('kw0');
            f.get('W').get('pl').add().get('ox').sub().set('kw1');
            f.get('kw1').get('KW').get('kw1').get('KW').ltS().select().set('kw1');
            f.get('kw0').get('kw1').geS().brIf(nextKh);
            f.get('kw1').get('kw0').sub().get('Cin').mul().set('k');
          }
          // xp = xImg + (iy * W + ox + kw0 - pl) * xs; wp = w + ((kh * KW + kw0) * Cin * Op + ob) * 4
          f.get('xImg').get('iy').get('W').mul().get('ox').add().get('kw0').add().get('pl').sub().get('xs').mul().add().set('xp');
          f.get('w').get('kh').get('KW').mul().get('kw0').add().get('Cin').mul().get('Op').mul().get('ob').add().i32(2).shl().add().set('wp');
          f.loop((top) => {
            f.get('wp').v128Load(0).set('w0');
            f.get('wp').v128Load(16).set('w1');
            for (let i = 0; i < P; i++) {
              f.get('xp');
              if (i > 0) f.get(i === 1 ? 'xs' : i === 2 ? 'xs2' : 'xs3').add();
              f.load32Splat(0).set('s');
              f.get(`a${i}0`).get('s').get('w0').f32x4Mul().f32x4Add().set(`a${i}0`);
              f.get(`a${i}1`).get('s').get('w1').f32x4Mul().f32x4Add().set(`a${i}1`);
            }
            f.inc('xp', 4);
            f.inc('wp', 'ys');
            f.get('k').i32(1).sub().tee('k').brIf(top);
          });
        });
        // store: y[n, oy, ox + i, ob .. ob + 7]
        f.get('yRow').get('ox').get('ys').mul().add().get('ob').i32(2).shl().add().set('yp');
        for (let i = 0; i < P; i++) {
          f.get('yp').get(`a${i}0`).v128Store(0);
          f.get('yp').get(`a${i}1`).v128Store(16);
          if (i < P - 1) f.inc('yp', 'ys');
        }
      });
    });
  };
  // Output rows r = n * oH + oy in [r0, r1) (threads split the rows).
  f.for('r', (g) => void g.get('r0'), (g) => void g.get('r1'), 1, () => {
    f.get('r').get('oH').divU().set('n');
    f.get('r').get('n').get('oH').mul().sub().set('oy');
    f.get('y').get('r').get('oW').mul().get('ys').mul().add().set('yRow');
    f.get('x').get('n').get('H').mul().get('W').mul().get('xs').mul().add().set('xImg');
    tiles(1, zero, (g) => void g.get('xa'));
    tiles(4, (g) => void g.get('xa'), (g) => void g.get('xb'));
    tiles(1, (g) => void g.get('xb'), (g) => void g.get('oW'));
  });
  return f;
}

export type BinaryOp = 'mul' | 'add' | 'sub' | 'rsub' | 'div' | 'rdiv';

/**
 * out[m, c] = big[m, c] op small[c] for m < M, c < C (C a multiple of 4); 'rsub' / 'rdiv' compute small op big.
 * The broadcasting binary ops of BatchNorm (x - mean, x * rsqrt(var), * gamma, + beta) and of their gradients.
 */
function buildBroadcast(op: BinaryOp): Fn {
  const f = new Fn(`bcast_${op}`, [
    ['big', I32],
    ['small', I32],
    ['out', I32],
    ['M', I32],
    ['C', I32],
  ]);
  f.locals(I32, 'p', 'q', 's', 'end', 'rowEnd', 'cb');
  f.get('C').i32(2).shl().set('cb');
  f.get('big').set('p');
  f.get('out').set('q');
  f.get('big').get('M').get('cb').mul().add().set('end');
  f.block((done) => {
    f.loop((rows) => {
      f.get('p').get('end').geU().brIf(done);
      f.get('small').set('s');
      f.get('p').get('cb').add().set('rowEnd');
      f.loop((cols) => {
        f.get('q');
        if (op === 'rsub' || op === 'rdiv') f.get('s').v128Load(0).get('p').v128Load(0);
        else f.get('p').v128Load(0).get('s').v128Load(0);
        if (op === 'mul') f.f32x4Mul();
        else if (op === 'add') f.f32x4Add();
        else if (op === 'sub' || op === 'rsub') f.f32x4Sub();
        else f.f32x4Div();
        f.v128Store(0);
        f.inc('p', 16);
        f.inc('q', 16);
        f.inc('s', 16);
        f.get('p').get('rowEnd').ltU().brIf(cols);
      });
      f.br(rows);
    });
  });
  return f;
}

/**
 * Gradient of a 2x2 stride-2 'valid' max-pool, C a multiple of 4: each window's dy goes to the first input equal
 * to the pooled maximum (row-major order); dx must be zeroed first (rows / columns outside every window stay 0).
 */
function buildMaxPoolGrad2x2(): Fn {
  const f = new Fn('maxPoolGrad2x2', [
    ['x', I32],
    ['pooled', I32],
    ['dy', I32],
    ['dx', I32],
    ['N', I32],
    ['H', I32],
    ['W', I32],
    ['C', I32],
    ['oH', I32],
    ['oW', I32],
  ]);
  f.locals(I32, 'n', 'oy', 'ox', 'c', 'px', 'pd', 'po', 'cs', 'rs', 'k');
  f.locals(V128, 'm', 'g', 'v', 'e', 'taken');
  const zero = (g: Fn): void => void g.i32(0);
  f.get('C').i32(2).shl().set('cs');
  f.get('W').get('cs').mul().set('rs');
  f.get('dy').set('po');
  f.get('pooled').set('k');
  f.for('n', zero, (g) => void g.get('N'), 1, () => {
    f.for('oy', zero, (g) => void g.get('oH'), 1, () => {
      f.for('ox', zero, (g) => void g.get('oW'), 1, () => {
        // window origin (2 oy, 2 ox) of image n, byte offsets in x and dx
        f.get('n').get('H').mul().get('oy').i32(1).shl().add().get('rs').mul().get('ox').i32(1).shl().get('cs').mul().add().set('pd');
        f.for('c', zero, (g) => void g.get('C'), 4, () => {
          f.get('k').v128Load(0).set('m');
          f.get('po').v128Load(0).set('g');
          f.v128Zero().set('taken');
          const offsets: Array<(g: Fn) => void> = [
            () => undefined,
            (g) => void g.get('cs').add(),
            (g) => void g.get('rs').add(),
            (g) => void g.get('rs').add().get('cs').add(),
          ];
          offsets.forEach((off, i) => {
            f.get('x').get('pd').add().get('c').i32(2).shl().add();
            off(f);
            f.set('px');
            // e = (x == max) & ~taken; taken |= e; dx = dy & e
            f.get('px').v128Load(0).get('m').f32x4Eq().get('taken').v128AndNot().set('e');
            if (i < 3) f.get('taken').get('e').v128Or().set('taken');
            f.get('dx').get('px').get('x').sub().add();
            f.get('g').get('e').v128And().v128Store(0);
          });
          f.inc('k', 16);
          f.inc('po', 16);
        });
      });
    });
  });
  return f;
}

/**
 * Gradient of a bilinear resize (one dy row at a time): every dy pixel adds dy * weight to the four input pixels it
 * was interpolated from. The row and column tables (built by the caller, 3 x 32-bit per entry) hold the byte
 * offsets of the two source rows (within an image) / columns and the interpolation fraction. C % 4 == 0; dx zeroed.
 */
function buildResizeBilinearGrad(): Fn {
  const f = new Fn('resizeBilinearGrad', [
    ['dy', I32],
    ['dx', I32],
    ['rowTbl', I32],
    ['colTbl', I32],
    ['N', I32],
    ['yH', I32],
    ['yW', I32],
    ['imgBytes', I32],
    ['C', I32],
  ]);
  f.locals(I32, 'n', 'r', 'c', 'k', 'img', 'rt', 'ct', 'top', 'bot', 'pTL', 'pTR', 'pBL', 'pBR', 'gp', 'cb');
  f.locals(F32, 'rl', 'irl', 'cl', 'icl');
  f.locals(V128, 'g', 'wTL', 'wTR', 'wBL', 'wBR');
  const zero = (g: Fn): void => void g.i32(0);
  f.get('C').i32(2).shl().set('cb');
  f.get('dy').set('gp');
  f.for('n', zero, (g) => void g.get('N'), 1, () => {
    f.get('dx').get('n').get('imgBytes').mul().add().set('img');
    f.for('r', zero, (g) => void g.get('yH'), 1, () => {
      f.get('rowTbl').get('r').i32(12).mul().add().set('rt');
      f.get('img').get('rt').i32Load(0).add().set('top');
      f.get('img').get('rt').i32Load(4).add().set('bot');
      f.get('rt').f32Load(8).set('rl');
      f.f32(1).get('rl').f32Sub().set('irl');
      f.for('c', zero, (g) => void g.get('yW'), 1, () => {
        f.get('colTbl').get('c').i32(12).mul().add().set('ct');
        f.get('ct').f32Load(8).set('cl');
        f.f32(1).get('cl').f32Sub().set('icl');
        f.get('irl').get('icl').f32Mul().f32x4Splat().set('wTL');
        f.get('irl').get('cl').f32Mul().f32x4Splat().set('wTR');
        f.get('rl').get('icl').f32Mul().f32x4Splat().set('wBL');
        f.get('rl').get('cl').f32Mul().f32x4Splat().set('wBR');
        f.get('top').get('ct').i32Load(0).add().set('pTL');
        f.get('top').get('ct').i32Load(4).add().set('pTR');
        f.get('bot').get('ct').i32Load(0).add().set('pBL');
        f.get('bot').get('ct').i32Load(4).add().set('pBR');
        f.for('k', zero, (g) => void g.get('cb'), 16, () => {
          f.get('gp').v128Load(0).set('g');
          f.inc('gp', 16);
          for (const [p, w] of [['pTL', 'wTL'], ['pTR', 'wTR'], ['pBL', 'wBL'], ['pBR', 'wBR']] as const) {
            f.get(p).get('k').add();
            f.get(p).get('k').add().v128Load(0).get('g').get(w).f32x4Mul().f32x4Add();
            f.v128Store(0);
          }
        });
      });
    });
  });
  return f;
}

export interface SimdKernels {
  resizeBilinearGrad(dy: number, dx: number, rowTbl: number, colTbl: number, N: number, yH: number, yW: number, imgBytes: number, C: number): void;
  maxPoolGrad2x2(x: number, pooled: number, dy: number, dx: number, N: number, H: number, W: number, C: number, oH: number, oW: number): void;
  bcast_mul(big: number, small: number, out: number, M: number, C: number): void;
  bcast_add(big: number, small: number, out: number, M: number, C: number): void;
  bcast_sub(big: number, small: number, out: number, M: number, C: number): void;
  bcast_rsub(big: number, small: number, out: number, M: number, C: number): void;
  bcast_div(big: number, small: number, out: number, M: number, C: number): void;
  bcast_rdiv(big: number, small: number, out: number, M: number, C: number): void;
  conv(
    x: number,
    w: number,
    y: number,
    r0: number,
    r1: number,
    H: number,
    W: number,
    Cin: number,
    oH: number,
    oW: number,
    Op: number,
    KH: number,
    KW: number,
    pt: number,
    pl: number,
    xa: number,
    xb: number,
  ): void;
  colSum(src: number, dst: number, R: number, B: number): void;
  copyRows(src: number, dst: number, rows: number, w: number, ss: number, ds: number): void;
  convFilterGrad(
    x: number,
    dy: number,
    acc: number,
    r0: number,
    r1: number,
    H: number,
    W: number,
    oH: number,
    oW: number,
    Cp: number,
    Op: number,
    KH: number,
    KW: number,
    pt: number,
    pl: number,
  ): void;
}

let bytes: Uint8Array | null = null;
const sharedBytes = new Map<number, Uint8Array>();
let compiled: WebAssembly.Module | null | undefined;
const instances = new WeakMap<WebAssembly.Memory, SimdKernels>();

function allFunctions(): Fn[] {
  return [
    buildConvFilterGrad(),
    buildColSum(),
    buildCopyRows(),
    buildConv(),
    buildMaxPoolGrad2x2(),
    buildResizeBilinearGrad(),
    ...(['mul', 'add', 'sub', 'rsub', 'div', 'rdiv'] as const).map(buildBroadcast),
  ];
}

/** The module's bytes for a shared memory of at most `maxPages` pages (the thread pool's variant). */
export function simdModuleBytesShared(maxPages: number): Uint8Array {
  let b = sharedBytes.get(maxPages);
  if (!b) sharedBytes.set(maxPages, (b = assemble(allFunctions(), { sharedMaxPages: maxPages })));
  return b;
}

/** The module's bytes (built once). */
export function simdModuleBytes(): Uint8Array {
  if (!bytes) bytes = assemble(allFunctions());
  return bytes;
}

/**
 * The kernels bound to `memory`, or null when this runtime cannot compile the module (no wasm SIMD): callers
 * then use their fallback path.
 */
export function simdKernelsFor(memory: WebAssembly.Memory): SimdKernels | null {
  const cached = instances.get(memory);
  if (cached) return cached;
  if (compiled === undefined) {
    try {
      compiled = new WebAssembly.Module(simdModuleBytes() as BufferSource);
    } catch {
      compiled = null;
    }
  }
  if (!compiled) return null;
  const inst = new WebAssembly.Instance(compiled, { env: { memory } });
  const k = inst.exports as unknown as SimdKernels;
  instances.set(memory, k);
  return k;
}
