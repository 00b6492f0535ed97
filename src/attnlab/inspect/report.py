"""The head-atlas report: one self-contained HTML page (works offline) plus matplotlib PNGs beside it.

``write_report(atlas, out_dir, compare=None)`` writes ``atlas.json``, ``atlas.csv``, ``report.html`` and
``grid_<metric>.png`` / ``roles.png`` / ``depth.png`` (/ ``basin.png``, ``compare.png``). The page embeds the
atlas as JSON inside ``<script type="application/json">`` with ``<``, ``>`` and ``&`` escaped, and its script
builds every element with DOM calls and ``textContent`` (never ``innerHTML``), so token text such as
``<script>`` is shown as text. No CDN, no network: inline CSS, inline JS, SVG.

With ``views`` (:class:`.views.ReportViews`, from ``views.build_views``) the page also has the head view
(bertviz-style token lines, pooled overview and full-resolution zooms for long prompts), patching / DLA /
knockout heatmaps, QK/OV circuit views, the joint query-key embedding (AttentionViz), a PNG button on every
view (SVG or canvas drawn into a PNG data URL and downloaded, in the page), ``views.json`` and each view's
matplotlib PNG. ``report.html#head=L.H`` opens with head (L, H) selected; ``#viewtest`` runs the views'
self-test (click tokens, zooms, heads; export every PNG) into ``<pre id="viewtest">``.

Opening ``report.html#selftest`` runs a small self-test in the page (click a head, check the view changed,
check no injected script ran) and writes the result as JSON into ``<pre id="selftest">``; the tests read it
with headless Chromium's ``--dump-dom``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .atlas import ROLES, HeadAtlas
from .views import ReportViews, write_view_pngs

ROLE_COLORS = {"retrieval": "#d62728", "induction": "#9467bd", "previous-token": "#ff7f0e", "sink": "#1f77b4",
               "local": "#2ca02c", "mixed": "#c7c7c7"}


def embed_json(obj) -> str:
    """JSON safe inside an HTML ``<script>`` element: no ``<``, ``>`` or ``&`` survive literally."""
    s = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:8px 0} h3{font-size:14px;margin:4px 0}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.panel{border:1px solid #ddd;border-radius:6px;padding:8px;background:#fafafa}
button{margin:2px;padding:3px 8px;border:1px solid #aaa;background:#fff;border-radius:4px;cursor:pointer}
button.on{background:#334;color:#fff}
table{border-collapse:collapse;font-size:12px} td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left}
rect.cell{cursor:pointer} rect.sel{stroke:#000;stroke-width:2}
.small{font-size:12px;color:#555} svg text{font-size:10px;font-family:monospace}
"""

JS = r"""
(function(){
const NS='http://www.w3.org/2000/svg';
const A=JSON.parse(document.getElementById('atlas-data').textContent);
const cEl=document.getElementById('compare-data');
const B=cEl?JSON.parse(cEl.textContent):null;
const ROLE_COLORS=JSON.parse(document.getElementById('role-colors').textContent);
let metric='role', sel=null, probe=Object.keys(A.maps)[0]||null;
function el(tag,attrs,parent,text){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);
  if(text!==undefined)e.textContent=text; if(parent)parent.appendChild(e); return e;}
function h(tag,parent,text){const e=document.createElement(tag); if(text!==undefined)e.textContent=text; if(parent)parent.appendChild(e); return e;}
const STOPS=[[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
function viridis(t){t=Math.max(0,Math.min(1,t));const x=t*(STOPS.length-1),i=Math.min(Math.floor(x),STOPS.length-2),f=x-i;
  const c=STOPS[i].map((v,k)=>Math.round(v+(STOPS[i+1][k]-v)*f));return 'rgb('+c.join(',')+')';}
function diverging(t){t=Math.max(-1,Math.min(1,t));const a=Math.round(255*(1-Math.abs(t)));
  return t>=0?'rgb(255,'+a+','+a+')':'rgb('+a+','+a+',255)';}
function range(M){let lo=Infinity,hi=-Infinity;for(const r of M)for(const v of r)if(v!==null){lo=Math.min(lo,v);hi=Math.max(hi,v);}
  if(lo===Infinity)return[0,1]; if(hi===lo)hi=lo+1e-9; return[lo,hi];}
function fmt(v){return v===null||v===undefined?'n/a':(Math.abs(v)>=100?v.toFixed(1):v.toPrecision(3));}
function grid(svg,atlas,m,clickable,diffWith){
  while(svg.firstChild)svg.removeChild(svg.firstChild);
  const L=atlas.num_layers,H=atlas.num_heads,cs=Math.max(10,Math.min(22,Math.floor(420/Math.max(H,L)))),x0=34,y0=16;
  svg.setAttribute('width',x0+H*cs+8); svg.setAttribute('height',y0+L*cs+8);
  for(let hh=0;hh<H;hh++)el('text',{x:x0+hh*cs+2,y:12},svg,String(hh));
  let M=null,lo=0,hi=1;
  if(m!=='role'){M=atlas.metrics[m]; if(diffWith){M=M.map((r,l)=>r.map((v,k)=>{const w=diffWith.metrics[m][l][k];return v===null||w===null?null:v-w;}));
    const rg=range(M);hi=Math.max(Math.abs(rg[0]),Math.abs(rg[1]))||1;lo=-hi;} else [lo,hi]=range(M);}
  for(let l=0;l<L;l++){el('text',{x:2,y:y0+l*cs+cs*0.75},svg,'L'+l);
    for(let hh=0;hh<H;hh++){let fill,val;
      if(m==='role'){val=atlas.roles[l][hh];fill=ROLE_COLORS[val]||'#ccc';}
      else{val=M[l][hh];fill=val===null?'#eee':(diffWith?diverging(val/hi):viridis((val-lo)/(hi-lo)));}
      const r=el('rect',{x:x0+hh*cs,y:y0+l*cs,width:cs-1,height:cs-1,fill:fill,'class':'cell','data-layer':l,'data-head':hh},svg);
      el('title',{},r,'layer '+l+' head '+hh+': '+(m==='role'?val:fmt(val)));
      if(clickable)r.addEventListener('click',()=>select(l,hh));
      if(sel&&sel[0]===l&&sel[1]===hh&&clickable)r.classList.add('sel');}}
  return [lo,hi];
}
function legend(div,lo,hi,m,isDiff){while(div.firstChild)div.removeChild(div.firstChild);
  if(m==='role'){for(const r of Object.keys(ROLE_COLORS)){const s=h('span',div);s.style.background=ROLE_COLORS[r];s.style.padding='1px 6px';s.style.marginRight='4px';s.textContent=r;}return;}
  const svg=el('svg',{width:260,height:28},div);for(let i=0;i<50;i++)el('rect',{x:i*5,y:0,width:5,height:12,fill:isDiff?diverging(i/24.5-1):viridis(i/49)},svg);
  el('text',{x:0,y:25},svg,fmt(lo));el('text',{x:200,y:25},svg,fmt(hi));}
function renderGrids(){
  const ra=grid(document.getElementById('gridA'),A,metric,true,null);legend(document.getElementById('legendA'),ra[0],ra[1],metric,false);
  if(B){const rb=grid(document.getElementById('gridB'),B,metric,false,null);legend(document.getElementById('legendB'),rb[0],rb[1],metric,false);
    const same=A.num_layers===B.num_layers&&A.num_heads===B.num_heads&&metric!=='role'&&B.metrics[metric];
    const box=document.getElementById('diffbox');box.style.display=same?'block':'none';
    if(same){const rd=grid(document.getElementById('gridD'),B,metric,false,A);legend(document.getElementById('legendD'),rd[0],rd[1],metric,true);}}
  renderDepth();
}
function renderButtons(){const d=document.getElementById('metrics');while(d.firstChild)d.removeChild(d.firstChild);
  for(const m of ['role'].concat(Object.keys(A.metrics))){const b=h('button',d,m);if(m===metric)b.className='on';
    b.addEventListener('click',()=>{metric=m;renderButtons();renderGrids();});}}
function select(l,hh){sel=[l,hh];
  const g=A.num_heads/A.num_kv_heads;
  document.getElementById('detail-title').textContent='Layer '+l+', head '+hh+' (kv head '+Math.floor(hh/g)+') \u2014 '+A.roles[l][hh];
  const t=document.getElementById('detail-metrics');while(t.firstChild)t.removeChild(t.firstChild);
  for(const m of Object.keys(A.metrics)){const tr=h('tr',t);h('td',tr,m);h('td',tr,fmt(A.metrics[m][l][hh]));
    if(B&&B.metrics[m]&&B.num_layers===A.num_layers&&B.num_heads===A.num_heads)h('td',tr,'B: '+fmt(B.metrics[m][l][hh]));}
  renderGrids();renderMap();}
function renderProbeSelect(){const s=document.getElementById('probe');
  for(const p of Object.keys(A.maps)){const o=h('option',s,p);o.value=p;}
  s.addEventListener('change',()=>{probe=s.value;renderMap();});}
function renderMap(){const svg=document.getElementById('map');while(svg.firstChild)svg.removeChild(svg.firstChild);
  if(!sel||!probe)return; const mp=A.maps[probe];const W=mp.weights[sel[0]][sel[1]];const n=W.length;
  const cs=Math.max(6,Math.min(16,Math.floor(520/n))),x0=120,y0=110;
  svg.setAttribute('width',x0+n*cs+10);svg.setAttribute('height',y0+n*cs+10);
  for(let i=0;i<n;i++){const lab=mp.labels[i];
    el('text',{x:x0-4,y:y0+i*cs+cs*0.8,'text-anchor':'end'},svg,lab.slice(0,16));
    el('text',{x:0,y:0,transform:'translate('+(x0+i*cs+cs*0.8)+','+(y0-4)+') rotate(-60)'},svg,lab.slice(0,16));
    let mx=1;for(const v of W[i])mx=Math.max(mx,v);
    for(let j=0;j<n;j++){const v=W[i][j];const r=el('rect',{x:x0+j*cs,y:y0+i*cs,width:cs,height:cs,fill:viridis(Math.sqrt(v/1000)),'class':'mapcell'},svg);
      el('title',{},r,'query '+JSON.stringify(lab)+' \u2192 key '+JSON.stringify(mp.labels[j])+': '+(v/1000).toFixed(3));}}}
function renderDepth(){const svg=document.getElementById('depth');while(svg.firstChild)svg.removeChild(svg.firstChild);
  if(metric==='role')return; const L=A.num_layers,w=360,hgt=160,x0=40;
  const means=A.metrics[metric].map(r=>{const v=r.filter(x=>x!==null);return v.length?v.reduce((a,b)=>a+b,0)/v.length:null;});
  const vals=means.filter(v=>v!==null);if(!vals.length)return;let lo=Math.min(...vals),hi=Math.max(...vals);if(hi===lo)hi=lo+1e-9;
  el('text',{x:0,y:12},svg,metric+' (mean over heads) by layer');el('text',{x:0,y:30},svg,fmt(hi));el('text',{x:0,y:hgt},svg,fmt(lo));
  let d='';means.forEach((v,l)=>{if(v===null)return;const x=x0+l*(w-x0)/Math.max(1,L-1),y=hgt-(v-lo)/(hi-lo)*(hgt-30);d+=(d?'L':'M')+x.toFixed(1)+','+y.toFixed(1);});
  el('path',{d:d,fill:'none',stroke:'#334','stroke-width':2},svg);}
function renderFlow(){const svg=document.getElementById('flow');if(!A.flow)return;const f=A.flow,n=f.labels.length;
  const roll=f.rollout[f.target],fl=f.flow,w=24,x0=10,hgt=120;let mr=Math.max(...roll,1e-9),mf=Math.max(...fl,1e-9);
  svg.setAttribute('width',x0+n*w+20);
  for(let j=0;j<n;j++){const a=roll[j]/mr*hgt*0.45,b=fl[j]/mf*hgt*0.45;
    el('rect',{x:x0+j*w,y:hgt*0.5-a,width:w/2-1,height:a,fill:'#1f77b4'},svg);
    el('rect',{x:x0+j*w+w/2,y:hgt*0.5-b,width:w/2-1,height:b,fill:'#ff7f0e'},svg);
    el('text',{x:0,y:0,transform:'translate('+(x0+j*w+8)+','+(hgt*0.5+8)+') rotate(60)'},svg,f.labels[j].slice(0,12));}}
function summary(){const s=document.getElementById('summary');
  h('div',s,A.num_layers+' layers \u00d7 '+A.num_heads+' heads ('+A.num_kv_heads+' key/value heads), '+(A.is_causal?'causal':'bidirectional')+
    '; probes: '+Object.keys(A.probes).map(p=>p+' ('+A.probes[p].tokens+' tokens)').join(', '));
  const t=h('table',s);const tr=h('tr',t);h('th',tr,'role');h('th',tr,A.model);if(B)h('th',tr,B.model);
  const count=(X)=>{const c={};for(const r of X.roles)for(const v of r)c[v]=(c[v]||0)+1;return c;};const ca=count(A),cb=B?count(B):null;
  for(const r of Object.keys(ROLE_COLORS)){const row=h('tr',t);h('td',row,r);h('td',row,String(ca[r]||0));if(B)h('td',row,String(cb[r]||0));}}
document.getElementById('title').textContent='Head atlas: '+A.model+(B?'  vs  '+B.model:'');
if(B){document.getElementById('boxB').style.display='block';document.getElementById('nameB').textContent=B.model;}
document.getElementById('nameA').textContent=A.model;
summary();renderButtons();renderProbeSelect();renderGrids();renderFlow();
const hm=location.hash.match(/^#head=(\d+)\.(\d+)$/);
if(hm&&+hm[1]<A.num_layers&&+hm[2]<A.num_heads)select(+hm[1],+hm[2]);
if(location.hash==='#selftest'){
  const res={};res.cells=document.querySelectorAll('#gridA rect.cell').length;
  res.title_before=document.getElementById('detail-title').textContent;res.map_before=document.querySelectorAll('#map rect').length;
  const l=Math.min(1,A.num_layers-1),hh=Math.min(1,A.num_heads-1);
  document.querySelector('#gridA rect[data-layer="'+l+'"][data-head="'+hh+'"]').dispatchEvent(new MouseEvent('click',{bubbles:true}));
  res.title_after=document.getElementById('detail-title').textContent;res.map_after=document.querySelectorAll('#map rect').length;
  res.labels=Array.from(document.querySelectorAll('#map text')).map(t=>t.textContent);
  res.pwned=window.__pwned===true;res.script_tags=document.querySelectorAll('script').length;
  res.compare=!!B;
  const mb=Array.from(document.querySelectorAll('#metrics button')).find(b=>b.textContent==='sink');
  if(mb)mb.dispatchEvent(new MouseEvent('click',{bubbles:true}));
  res.metric_after=metric;res.fills=new Set(Array.from(document.querySelectorAll('#gridA rect.cell')).map(r=>r.getAttribute('fill'))).size;
  res.diff_cells=document.querySelectorAll('#gridD rect.cell').length;
  document.getElementById('selftest').textContent=JSON.stringify(res);}
})();
"""


VIEWS_CSS = """
.hvtok{cursor:pointer} .hvtok.pin{font-weight:bold;fill:#c00} canvas.heat{cursor:crosshair;border:1px solid #eee}
button.png{font-size:11px;padding:1px 6px} .cap{font-size:12px;font-family:monospace;min-height:16px}
"""

VIEWS_JS = r"""
(function(){
const NS='http://www.w3.org/2000/svg';
const V=JSON.parse(document.getElementById('views-data').textContent);
const TEST=location.hash==='#viewtest';
function el(tag,attrs,parent,text){const e=document.createElementNS(NS,tag);for(const k in attrs)e.setAttribute(k,attrs[k]);
  if(text!==undefined)e.textContent=text; if(parent)parent.appendChild(e); return e;}
function h(tag,parent,text){const e=document.createElement(tag); if(text!==undefined)e.textContent=text; if(parent)parent.appendChild(e); return e;}
function clear(e){while(e.firstChild)e.removeChild(e.firstChild);}
const STOPS=[[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
function viridis(t){t=Math.max(0,Math.min(1,t));const x=t*(STOPS.length-1),i=Math.min(Math.floor(x),STOPS.length-2),f=x-i;
  const c=STOPS[i].map((v,k)=>Math.round(v+(STOPS[i+1][k]-v)*f));return 'rgb('+c.join(',')+')';}
function diverging(t){t=Math.max(-1,Math.min(1,t));const a=Math.round(255*(1-Math.abs(t)));
  return t>=0?'rgb(255,'+a+','+a+')':'rgb('+a+','+a+',255)';}
function fmt(v){return v===null||v===undefined?'n/a':(Math.abs(v)>=100?v.toFixed(1):v.toPrecision(3));}
const HC=['#1f77b4','#d62728','#2ca02c','#9467bd','#ff7f0e','#8c564b'];
// ---- PNG export: a canvas directly; an SVG serialized, drawn into a canvas, then encoded (no server)
function pngOf(node){
  if(node.tagName.toLowerCase()==='canvas')return Promise.resolve(node.toDataURL('image/png'));
  const w=+node.getAttribute('width'),ht=+node.getAttribute('height');const c=node.cloneNode(true);
  c.setAttribute('xmlns',NS);const bg=document.createElementNS(NS,'rect');bg.setAttribute('width',w);bg.setAttribute('height',ht);
  bg.setAttribute('fill','#fff');c.insertBefore(bg,c.firstChild);
  const src='data:image/svg+xml;charset=utf-8,'+encodeURIComponent(new XMLSerializer().serializeToString(c));
  return new Promise((res,rej)=>{const img=new Image();img.onload=()=>{const cv=document.createElement('canvas');cv.width=w;cv.height=ht;
    const ctx=cv.getContext('2d');ctx.fillStyle='#fff';ctx.fillRect(0,0,w,ht);ctx.drawImage(img,0,0);res(cv.toDataURL('image/png'));};
    img.onerror=()=>rej(new Error('the SVG did not load as an image'));img.src=src;});}
function exportButton(parent,name,getNode){const b=h('button',parent,'PNG');b.className='png';b.dataset.view=name;b.title='download this view as '+name+'.png';
  b.addEventListener('click',()=>{b.dataset.state='pending';pngOf(getNode()).then(u=>{let a=document.getElementById('png-'+name);
    if(!a){a=h('a',document.getElementById('png-links'));a.id='png-'+name;h('span',document.getElementById('png-links'),' ');}
    a.href=u;a.download=name+'.png';a.textContent=name+'.png';b.dataset.state='done';b.dataset.bytes=String(u.length);if(!TEST)a.click();})
    .catch(e=>{b.dataset.state='error: '+e.message;});});return b;}
// ---- canvas heatmap with labels; returns a lookup (x, y) -> [row, col] for hover / click captions
function heat(cv,M,signed,xl,yl,opts){opts=opts||{};const R=M.length,C=R?M[0].length:0;
  const cw=opts.cell||Math.max(2,Math.min(18,Math.floor(560/Math.max(C,1)))),ch=opts.cell||Math.max(2,Math.min(18,Math.floor(420/Math.max(R,1))));
  const showX=cw>=8,showY=ch>=8,x0=showY?70:8,y0=showX?60:8;cv.width=x0+C*cw+8;cv.height=y0+R*ch+8;
  const ctx=cv.getContext('2d');ctx.fillStyle='#fff';ctx.fillRect(0,0,cv.width,cv.height);
  let lo=Infinity,hi=-Infinity;for(const r of M)for(const v of r)if(v!==null){lo=Math.min(lo,v);hi=Math.max(hi,v);}
  if(lo===Infinity){lo=0;hi=1;} const amax=Math.max(Math.abs(lo),Math.abs(hi))||1; if(hi===lo)hi=lo+1e-9;
  for(let i=0;i<R;i++)for(let j=0;j<C;j++){const v=M[i][j];ctx.fillStyle=v===null?'#eee':(signed?diverging(v/amax):viridis((v-lo)/(hi-lo)));
    ctx.fillRect(x0+j*cw,y0+i*ch,cw-(cw>4?1:0),ch-(ch>4?1:0));}
  ctx.fillStyle='#222';ctx.font='10px monospace';
  if(showY)for(let i=0;i<R;i++){ctx.textAlign='right';ctx.fillText(String(yl[i]).slice(0,10),x0-3,y0+i*ch+ch*0.8);}
  if(showX)for(let j=0;j<C;j++){ctx.save();ctx.translate(x0+j*cw+cw*0.7,y0-3);ctx.rotate(-Math.PI/3);ctx.textAlign='left';
    ctx.fillText(String(xl[j]).slice(0,10),0,0);ctx.restore();}
  return (x,y)=>{const j=Math.floor((x-x0)/cw),i=Math.floor((y-y0)/ch);return(i>=0&&i<R&&j>=0&&j<C)?[i,j]:null;};}
function pointer(cv,ev){const r=cv.getBoundingClientRect();return [(ev.clientX-r.left)*cv.width/r.width,(ev.clientY-r.top)*cv.height/r.height];}
// ---- head view (bertviz-style)
const HV=V.head_view;let hvLevel=-1,hvPin=null;const hvOn=new Set(HV?HV.heads.map((_,i)=>i):[]);
function hvApply(f){for(const ln of document.querySelectorAll('#hv-svg line.hvline')){
  const ok=!f||(f.side==='q'?+ln.dataset.q===f.i:+ln.dataset.k===f.i);ln.style.display=ok?'':'none';}
  for(const t of document.querySelectorAll('#hv-svg text.hvtok')){const on=f&&t.dataset.side===f.side&&+t.dataset.i===f.i;t.classList.toggle('pin',!!on);}}
function hvRender(){const svg=document.getElementById('hv-svg');clear(svg);
  let ql,kl,mats,q0=0,k0=0;
  if(hvLevel<0){ql=kl=HV.labels;mats=HV.heads.map(x=>x.overview);}
  else{const z=HV.zooms[hvLevel];ql=z.qlabels;kl=z.klabels;q0=z.q[0];k0=z.k[0];mats=HV.heads.map(x=>x.zooms[hvLevel]);}
  const n=Math.max(ql.length,kl.length),rh=Math.max(9,Math.min(16,Math.floor(960/n))),xl=220,xr=460,y0=16;
  svg.setAttribute('width',700);svg.setAttribute('height',y0+n*rh+10);
  el('text',{x:xl,y:11,'text-anchor':'end'},svg,'queries'+(hvLevel<0?'':' '+q0+'..'+(q0+ql.length-1)));
  el('text',{x:xr,y:11},svg,'keys'+(hvLevel<0?'':' '+k0+'..'+(k0+kl.length-1)));
  const g=el('g',{},svg);
  mats.forEach((M,hi)=>{if(!hvOn.has(hi))return;for(let i=0;i<M.length;i++)for(let j=0;j<M[i].length;j++){const w=M[i][j]/1000;if(w<0.01)continue;
    el('line',{x1:xl+4,y1:y0+i*rh+rh/2,x2:xr-4,y2:y0+j*rh+rh/2,stroke:HC[hi%HC.length],'stroke-opacity':w.toFixed(3),'stroke-width':2,
      'class':'hvline','data-q':i,'data-k':j,'data-h':hi},g);}});
  const tok=(side,labs,x,anchor)=>labs.forEach((s,i)=>{const t=el('text',{x:x,y:y0+i*rh+rh*0.75,'text-anchor':anchor,'class':'hvtok',
      'data-side':side,'data-i':i},svg,s);
    t.addEventListener('mouseenter',()=>{if(!hvPin)hvApply({side:side,i:i});});
    t.addEventListener('mouseleave',()=>{if(!hvPin)hvApply(null);});
    t.addEventListener('click',()=>{hvPin=(hvPin&&hvPin.side===side&&hvPin.i===i)?null:{side:side,i:i};hvApply(hvPin);});});
  tok('q',ql,xl,'end');tok('k',kl,xr,'start');hvApply(hvPin);}
function hvControls(){const hd=document.getElementById('hv-heads');
  HV.heads.forEach((x,i)=>{const b=h('button',hd,'L'+x.layer+'.H'+x.head);b.style.borderColor=HC[i%HC.length];b.style.color=HC[i%HC.length];
    b.className='on hvhead';b.style.background='#fff';b.style.fontWeight='bold';
    b.addEventListener('click',()=>{if(hvOn.has(i)){hvOn.delete(i);b.style.fontWeight='normal';b.style.opacity='0.5';}
      else{hvOn.add(i);b.style.fontWeight='bold';b.style.opacity='1';}hvRender();});});
  const lv=document.getElementById('hv-levels');
  const mk=(label,idx)=>{const b=h('button',lv,label);b.className='hvlevel'+(idx===hvLevel?' on':'');b.dataset.level=idx;
    b.addEventListener('click',()=>{hvLevel=idx;hvPin=null;for(const o of lv.children)o.classList.toggle('on',+o.dataset.level===idx);hvRender();});};
  mk(HV.pooled?'overview ('+HV.blocks+' bins)':'all tokens',-1);
  HV.zooms.forEach((z,i)=>mk('zoom q '+z.q[0]+'..'+(z.q[1]-1)+' \u00d7 k '+z.k[0]+'..'+(z.k[1]-1),i));
  document.getElementById('hv-rule').textContent=HV.pooled?('Pooled: '+HV.rule+'. Zooms are full resolution.'):HV.T+' tokens, full resolution.';
  exportButton(document.getElementById('hv-title'),'head_view',()=>document.getElementById('hv-svg'));hvRender();}
// ---- heatmaps (patching, DLA, knockout, ...)
function heatmaps(){const box=document.getElementById('hm-list');
  for(const name of Object.keys(V.heatmaps)){const m=V.heatmaps[name];const p=h('div',box);p.className='panel';
    const t=h('h3',p,m.title+' ');exportButton(t,'heatmap_'+name,()=>cv);
    const cv=h('canvas',p);cv.className='heat';cv.dataset.name=name;const cap=h('div',p,m.yname+' \u00d7 '+m.xname+': hover or click a cell');cap.className='cap';
    const at=heat(cv,m.matrix,m.signed,m.xlabels,m.ylabels);
    const show=(ev)=>{const c=at(...pointer(cv,ev));if(c)cap.textContent=m.yname+' '+m.ylabels[c[0]]+', '+m.xname+' '+m.xlabels[c[1]]+': '+fmt(m.matrix[c[0]][c[1]]);};
    cv.addEventListener('mousemove',show);cv.addEventListener('click',show);}}
// ---- QK / OV circuits
function circuits(){const C=V.circuits,L=C.num_layers,H=C.num_heads;
  const cv=document.getElementById('circ-copy'),cap=document.getElementById('circ-cap'),sv=document.getElementById('circ-sv');
  const at=heat(cv,C.copying,true,[...Array(H).keys()].map(String),[...Array(L).keys()].map(i=>'L'+i));
  const pick=(l,hh)=>{cap.textContent='layer '+l+' head '+hh+': copying score '+fmt(C.copying[l][hh])+'; QK and OV singular values';
    const qk=C.qk_sv[l][hh],ov=C.ov_sv[l][hh],n=Math.max(qk.length,ov.length),bw=Math.max(3,Math.min(10,Math.floor(260/n)));
    sv.width=2*(n*bw+30)+20;sv.height=150;const ctx=sv.getContext('2d');ctx.fillStyle='#fff';ctx.fillRect(0,0,sv.width,sv.height);
    [[qk,'QK','#1f77b4',10],[ov,'OV','#d62728',n*bw+50]].forEach(([s,lab,col,x0])=>{const mx=Math.max(...s.map(v=>v||0),1e-12);
      ctx.fillStyle=col;s.forEach((v,i)=>{const hh2=(v||0)/mx*110;ctx.fillRect(x0+i*bw,130-hh2,bw-1,hh2);});
      ctx.fillStyle='#222';ctx.font='10px monospace';ctx.fillText(lab+' (max '+fmt(mx)+')',x0,145);});
    sv.dataset.head=l+'.'+hh;};
  const onc=(ev)=>{const c=at(...pointer(cv,ev));if(c)pick(c[0],c[1]);};cv.addEventListener('click',onc);pick(0,0);
  exportButton(document.getElementById('circ-title'),'copying',()=>cv);exportButton(document.getElementById('circ-title'),'spectra',()=>sv);
  const kinds=Object.keys(C.composition),kb=document.getElementById('comp-kinds'),cc=document.getElementById('comp'),ccap=document.getElementById('comp-cap');
  if(!kinds.length){document.getElementById('comp-box').style.display='none';return;}
  const names=[];for(let l=0;l<L;l++)for(let hh=0;hh<H;hh++)names.push('L'+l+'.H'+hh);
  let kat=null,kind=kinds.includes('k')?'k':kinds[0];
  const draw=()=>{kat=heat(cc,C.composition[kind],false,names,names,{cell:Math.max(1,Math.min(12,Math.floor(540/names.length)))});
    for(const b of kb.children)b.classList.toggle('on',b.textContent===kind.toUpperCase());cc.dataset.kind=kind;};
  for(const k of kinds){const b=h('button',kb,k.toUpperCase());b.addEventListener('click',()=>{kind=k;draw();});}
  cc.addEventListener('mousemove',(ev)=>{const c=kat(...pointer(cc,ev));if(c)ccap.textContent=kind.toUpperCase()+'-composition '+names[c[0]]+' \u2192 '+names[c[1]]+': '+fmt(C.composition[kind][c[0]][c[1]]/1000);});
  exportButton(document.getElementById('comp-title'),'composition',()=>cc);draw();}
// ---- AttentionViz: joint query-key embedding
function qkview(){const Q=V.qk,svg=document.getElementById('qk-svg'),cap=document.getElementById('qk-cap'),W=440,pad=20;
  svg.setAttribute('width',W);svg.setAttribute('height',W);
  const all=Q.q.concat(Q.k);let x0=Infinity,x1=-Infinity,y0=Infinity,y1=-Infinity;for(const p of all){x0=Math.min(x0,p[0]);x1=Math.max(x1,p[0]);y0=Math.min(y0,p[1]);y1=Math.max(y1,p[1]);}
  const s=(W-2*pad)/Math.max(x1-x0,y1-y0,1e-12),X=v=>pad+(v-x0)*s,Y=v=>W-pad-(v-y0)*s;
  const pts={q:[],k:[]};
  for(const kind of ['k','q'])Q[kind].forEach((p,i)=>{const c=el('circle',{cx:X(p[0]).toFixed(1),cy:Y(p[1]).toFixed(1),r:3,fill:kind==='q'?'#1f77b4':'#d62728',
      'fill-opacity':0.75,'class':'qkpt','data-kind':kind,'data-i':i},svg);
    el('title',{},c,(kind==='q'?'query ':'key ')+Q.positions[i]+': '+Q.labels[i]);pts[kind][i]=c;
    c.addEventListener('mouseenter',()=>{cap.textContent=(kind==='q'?'query':'key')+' at '+Q.positions[i]+': '+Q.labels[i];
      for(const o of ['q','k'])pts[o][i].setAttribute('r',7);});
    c.addEventListener('mouseleave',()=>{for(const o of ['q','k'])pts[o][i].setAttribute('r',3);});});
  document.getElementById('qk-title').textContent='Joint query-key embedding, layer '+Q.layer+' head '+Q.head+' (blue: queries, red: keys; axes explain '+
    (100*Q.explained[0]).toFixed(1)+'% and '+(100*Q.explained[1]).toFixed(1)+'%) ';
  exportButton(document.getElementById('qk-title'),'qk_embedding',()=>svg);}
if(HV)hvControls(); else document.getElementById('hv-box').style.display='none';
if(Object.keys(V.heatmaps).length)heatmaps(); else document.getElementById('hm-box').style.display='none';
if(V.circuits)circuits(); else document.getElementById('circ-box').style.display='none';
if(V.qk)qkview(); else document.getElementById('qk-box').style.display='none';
function inked(cv){const d=cv.getContext('2d').getImageData(0,0,cv.width,cv.height).data;const seen=new Set();
  for(let i=0;i<d.length;i+=4*7){seen.add(d[i]+','+d[i+1]+','+d[i+2]);if(seen.size>8)break;}return seen.size;}
const click=(e)=>e.dispatchEvent(new MouseEvent('click',{bubbles:true}));
function clickAt(cv,x,y){const r=cv.getBoundingClientRect();cv.dispatchEvent(new MouseEvent('click',{bubbles:true,
  clientX:r.left+x*r.width/cv.width,clientY:r.top+y*r.height/cv.height}));}
async function selftest(){const r={};const vis=()=>Array.from(document.querySelectorAll('#hv-svg line.hvline')).filter(l=>l.style.display!=='none').length;
  if(HV){r.hv_tokens=Array.from(document.querySelectorAll('#hv-svg text.hvtok')).map(t=>t.textContent);
    r.hv_lines_before=vis();const tq=document.querySelector('#hv-svg text.hvtok[data-side="q"][data-i="'+(HV.labels.length-1)+'"]');click(tq);
    r.hv_lines_pinned=vis();r.hv_pinned=!!document.querySelector('#hv-svg text.pin');click(tq);r.hv_lines_unpinned=vis();
    const hb=document.querySelector('#hv-heads button');click(hb);r.hv_lines_one_head_off=vis();click(hb);
    const zb=document.querySelector('#hv-levels button[data-level="0"]');
    if(zb){click(zb);r.hv_zoom_tokens=Array.from(document.querySelectorAll('#hv-svg text.hvtok')).map(t=>t.textContent);r.hv_zoom_lines=vis();}}
  r.canvases={};for(const cv of document.querySelectorAll('canvas'))if(cv.width>1)r.canvases[cv.id||cv.dataset.name]=inked(cv);
  const hm=document.querySelector('canvas.heat');if(hm){const cap=hm.nextSibling;r.hm_cap_before=cap.textContent;
    clickAt(hm,hm.width-12,hm.height-12);r.hm_cap_after=cap.textContent;}
  if(V.circuits){const cv=document.getElementById('circ-copy');r.circ_before=document.getElementById('circ-sv').dataset.head;
    clickAt(cv,cv.width-12,cv.height-12);r.circ_after=document.getElementById('circ-sv').dataset.head;
    const kb=Array.from(document.querySelectorAll('#comp-kinds button'));if(kb.length){r.comp_before=document.getElementById('comp').dataset.kind;
      click(kb[0]);r.comp_after=document.getElementById('comp').dataset.kind;}}
  if(V.qk){r.qk_points=document.querySelectorAll('#qk-svg circle').length;r.qk_cap_before=document.getElementById('qk-cap').textContent;
    document.querySelector('#qk-svg circle[data-kind="q"]').dispatchEvent(new MouseEvent('mouseenter'));r.qk_cap_after=document.getElementById('qk-cap').textContent;}
  const btns=Array.from(document.querySelectorAll('button.png'));btns.forEach(click);
  for(let t=0;t<100&&btns.some(b=>b.dataset.state==='pending');t++)await new Promise(res=>setTimeout(res,20));
  r.png={};for(const b of btns){const a=document.getElementById('png-'+b.dataset.view);r.png[b.dataset.view]={state:b.dataset.state,
    head:a?a.getAttribute('href').slice(0,22):null,bytes:+(b.dataset.bytes||0)};}
  r.pwned=window.__pwned===true;document.getElementById('viewtest').textContent=JSON.stringify(r);}
if(TEST)selftest().catch(e=>{document.getElementById('viewtest').textContent=JSON.stringify({error:String(e)});});
})();
"""


VIEWS_HTML = """
<h2>Views</h2>
<div class="panel" id="hv-box"><h3 id="hv-title">Head view: queries (left) to keys (right), line opacity = attention
 weight; hover a token to see its lines, click to pin </h3><div id="hv-heads"></div><div id="hv-levels"></div>
 <div class="small" id="hv-rule"></div><svg id="hv-svg" width="10" height="10"></svg></div>
<div class="panel" id="hm-box"><h3>Patching and knockout heatmaps</h3><div id="hm-list" class="row"></div></div>
<div class="panel" id="circ-box"><h3 id="circ-title">QK / OV circuits: copying score per head (click a head for its
 singular values) </h3><div class="row"><canvas id="circ-copy" class="heat"></canvas><div><div id="circ-cap" class="cap"></div>
 <canvas id="circ-sv" width="10" height="10"></canvas></div></div>
 <div id="comp-box"><h3 id="comp-title">Composition scores (row: writer head, column: reader head) </h3>
 <div id="comp-kinds"></div><canvas id="comp" class="heat"></canvas><div id="comp-cap" class="cap"></div></div></div>
<div class="panel" id="qk-box"><h3 id="qk-title"></h3><svg id="qk-svg" width="10" height="10"></svg>
 <div id="qk-cap" class="cap">hover a point</div></div>
<div class="small">PNG downloads: <span id="png-links"></span></div>
<pre id="viewtest"></pre>
"""


def render_html(atlas: HeadAtlas, compare: HeadAtlas | None = None, views: ReportViews | None = None) -> str:
    """The report page as a string (self-contained); ``views`` adds the head view, heatmaps, circuit and
    query-key views (``attnlab.inspect.views``) with their PNG buttons, and two more script elements."""
    data = embed_json(atlas.to_dict())
    cmp = f'<script type="application/json" id="compare-data">{embed_json(compare.to_dict())}</script>' if compare else ""
    extra = ""
    if views is not None:
        extra = (f'{VIEWS_HTML}<script type="application/json" id="views-data">{embed_json(views.to_dict())}</script>'
                 f"<script>{VIEWS_JS}</script>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attnlab head atlas</title><style>{CSS}{VIEWS_CSS if views else ""}</style></head>
<body>
<h1 id="title"></h1><div id="summary" class="small"></div>
<h2>Head grids</h2><div class="small">Rows are layers, columns heads. Pick a metric; click a head of the
first grid to see its metrics and attention map.</div>
<div id="metrics"></div>
<div class="row">
 <div class="panel"><h3 id="nameA"></h3><svg id="gridA"></svg><div id="legendA"></div></div>
 <div class="panel" id="boxB" style="display:none"><h3 id="nameB"></h3><svg id="gridB"></svg><div id="legendB"></div></div>
 <div class="panel" id="diffbox" style="display:none"><h3>difference (B - A)</h3><svg id="gridD"></svg>
  <div id="legendD"></div></div>
 <div class="panel"><svg id="depth" width="380" height="170"></svg></div>
</div>
<div class="row">
 <div class="panel"><h2 id="detail-title">Click a head in the grid</h2><table id="detail-metrics"></table></div>
 <div class="panel"><h3>Attention map <select id="probe"></select></h3><svg id="map" width="10" height="10"></svg></div>
</div>
<div class="panel"><h3>Rollout (blue) and attention flow (orange) into the last position (Abnar &amp; Zuidema)</h3>
 <svg id="flow" width="10" height="200"></svg></div>
<pre id="selftest"></pre>
<script type="application/json" id="atlas-data">{data}</script>
{cmp}
<script type="application/json" id="role-colors">{embed_json(ROLE_COLORS)}</script>
<script>{JS}</script>
{extra}
</body></html>
"""


def write_pngs(atlas: HeadAtlas, out_dir: Path, compare: HeadAtlas | None = None) -> list[Path]:
    """Matplotlib PNGs of the grids (one per metric), roles, depth profile, basin profile, comparison."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import ListedColormap

    paths = []
    figsize = (max(4, atlas.num_heads * 0.45 + 2), max(3, atlas.num_layers * 0.22 + 1.5))
    for name in atlas.metrics:
        m = atlas.metric(name).numpy()
        fig, ax = plt.subplots(figsize=figsize)
        im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{atlas.model}: {name}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out_dir / f"grid_{name}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    idx = np.array([[ROLES.index(r) for r in row] for row in atlas.roles])
    fig, ax = plt.subplots(figsize=figsize)
    ax.imshow(idx, aspect="auto", cmap=ListedColormap([ROLE_COLORS[r] for r in ROLES]), vmin=-0.5,
              vmax=len(ROLES) - 0.5)
    ax.set_title(f"{atlas.model}: roles")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=ROLE_COLORS[r]) for r in ROLES]
    ax.legend(handles, ROLES, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "roles.png", dpi=90)
    plt.close(fig)
    paths.append(out_dir / "roles.png")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("sink", "entropy_norm", "locality", "induction", "retrieval", "lookback"):
        if name in atlas.metrics:
            axes[0].plot(np.nanmean(atlas.metric(name).numpy(), axis=1), label=name)
    axes[0].set_xlabel("layer")
    axes[0].set_title("mean over heads by depth")
    axes[0].legend(fontsize=7)
    if atlas.layer_metrics.get("max_abs"):
        axes[1].semilogy(atlas.layer_metrics["max_abs"], label="max |h|")
        axes[1].semilogy(atlas.layer_metrics["median_abs"], label="median |h|")
        axes[1].set_title("massive activations (hidden states)")
        axes[1].set_xlabel("layer")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "depth.png", dpi=90)
    plt.close(fig)
    paths.append(out_dir / "depth.png")
    if atlas.profile is not None:
        prof = np.array(atlas.profile)  # (L, H, bins)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        layers = prof.mean(1)
        for i in range(0, atlas.num_layers, max(1, atlas.num_layers // 6)):
            ax.plot(layers[i], label=f"layer {i}")
        ax.plot(layers.mean(0), "k--", lw=2, label="all layers")
        ax.set_xlabel("position bin of the context")
        ax.set_ylabel("share of context attention")
        ax.set_title("positional profile (attention basin)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "basin.png", dpi=90)
        plt.close(fig)
        paths.append(out_dir / "basin.png")
    if compare is not None:
        names = [n for n in atlas.metrics if n in compare.metrics]
        fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 3.5))
        xa = [float(np.nanmean(atlas.metric(n).numpy())) for n in names]
        xb = [float(np.nanmean(compare.metric(n).numpy())) for n in names]
        pos = np.arange(len(names))
        ax.bar(pos - 0.2, xa, 0.4, label=atlas.model)
        ax.bar(pos + 0.2, xb, 0.4, label=compare.model)
        ax.set_xticks(pos, names, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title("mean over heads")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "compare.png", dpi=90)
        plt.close(fig)
        paths.append(out_dir / "compare.png")
    return paths


def write_report(atlas: HeadAtlas, out_dir: str | Path, compare: HeadAtlas | None = None,
                 pngs: bool = True, views: ReportViews | None = None) -> dict[str, Path]:
    """Write atlas.json, atlas.csv, report.html (and PNGs) into ``out_dir``; returns their paths. With
    ``views`` also views.json and each view's PNG (``views.write_view_pngs``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": atlas.save(out / "atlas.json"), "csv": atlas.to_csv(out / "atlas.csv")}
    html = out / "report.html"
    html.write_text(render_html(atlas, compare, views), encoding="utf-8")
    paths["html"] = html
    if views is not None:
        paths["views"] = out / "views.json"
        paths["views"].write_text(json.dumps(views.to_dict(), separators=(",", ":")), encoding="utf-8")
    if pngs:
        for p in write_pngs(atlas, out, compare) + (write_view_pngs(views, out) if views is not None else []):
            paths[p.stem] = p
    return paths
